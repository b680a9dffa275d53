"""Real labelled sample data that ships with a package on disk (nothing downloads at run time)."""
