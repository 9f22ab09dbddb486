"""Report: the curation report and catalog queries."""
