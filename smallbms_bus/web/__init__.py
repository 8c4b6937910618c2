"""The commissioning web page and its JSON API (docs/api.md): served by the service on its own event loop."""
