"""Pure protocol code: packet decoding and request state. No I/O, no ctypes, no trio."""
