"""The built-in recipe stages: thin wrappers that validate a config and call the library."""
