"""One module per kind of training (sft.py, dpo.py, distill.py): inputs in, a trained model
directory out, over the `training` toolkit. No store, no Dagster."""
