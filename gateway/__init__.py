"""The daemon and its sources, configuration, the command line and the lab."""
