"""devca."""
