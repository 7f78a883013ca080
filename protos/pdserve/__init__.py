"""The `pdserve` proto package; each API version is a subpackage."""
