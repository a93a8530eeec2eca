"""supmae package."""
