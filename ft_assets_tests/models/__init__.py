"""Tests of ft_assets/models/."""
