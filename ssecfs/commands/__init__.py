"""The `ssecfs` command line: mount, umount, status, keygen, check, rekey."""
