"""Policy bundles: YAML models, loader, compiled snapshot and hot reload."""
