"""Loads the test network guard (netguard.py) into every Python process started with this
directory on PYTHONPATH and SSECFS_NETGUARD_LOG set; children inherit both."""

import netguard

netguard.install_from_env()
