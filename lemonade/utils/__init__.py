"""Small shared helpers, one C++ utils module each."""
