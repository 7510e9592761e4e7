"""The Flower glue, written once for every strategy: ServerApp, ClientApp and the adapter."""
