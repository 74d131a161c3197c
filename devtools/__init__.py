"""Developer tooling (emulators, local runs). Not shipped to Dataflow workers."""
