"""The Mitigation API: the platform's service-to-service face (FastAPI). Not shipped to Dataflow workers."""
