"""Tests of ft_assets/cli/."""
