"""The embedded demo model and `fdm demo`."""
