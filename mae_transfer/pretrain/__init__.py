"""MAE pretraining: the model, its recipe, the training task and the speed benchmark."""
