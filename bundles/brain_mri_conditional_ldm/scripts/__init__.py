"""Conditional LDM bundle code that is specific to this bundle (config targets: ``scripts.<module>.<name>``)."""
