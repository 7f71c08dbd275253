"""callback."""
