"""Base models: resolve and load (base_model.py), quantize, devices and GPU leases. No training."""
