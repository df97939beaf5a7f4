"""Shared machinery behind the CogVideoX Cog predictors."""
