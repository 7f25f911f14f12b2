"""Fleets: cohorts of devices that train one student per device class together."""
