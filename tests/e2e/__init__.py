"""Browser tests of the dashboard (``make e2e``)."""
