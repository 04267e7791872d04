"""The tunnel data plane: the CONNECT preamble (sans-I/O) and the byte relay."""
