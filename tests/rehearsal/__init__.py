"""The rehearsal of the real study on stand-ins: see harness.py and README "Rehearsal"."""
