"""Data in: readers per format (rows.py, hfdata.py), chat rendering and masks (chat.py), the
Arrow SFT dataset (sft_dataset.py), preference pairs, task mixtures. Imports config only."""
