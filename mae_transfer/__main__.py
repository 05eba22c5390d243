"""``python -m mae_transfer`` (what ``torchrun -m mae_transfer`` runs)."""

import sys

from mae_transfer.cli import main

sys.exit(main())
