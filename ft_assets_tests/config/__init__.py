"""Tests of ft_assets/config/."""
