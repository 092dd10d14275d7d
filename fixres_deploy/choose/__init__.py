"""Selection of the operating point and the report that explains it."""
