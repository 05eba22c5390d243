"""Classification transfer: iNaturalist, Places and ImageNet-style folders (MAE paper Table 6)."""
