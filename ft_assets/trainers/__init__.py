"""One module per kind of training (sft.py, preference/, distill.py), over the `training` toolkit
and, for those built on TRL's trainers, `trl_common.py`: inputs in, a trained model directory
out. No store, no Dagster."""
