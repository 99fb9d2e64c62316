"""The business side: orders that must commit or roll back with their jobs."""
