"""Tests of ft_assets/publish/."""
