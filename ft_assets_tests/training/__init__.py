"""Tests of ft_assets/training/."""
