"""The relay's ends of tunnels, one module per wire protocol, behind one contract."""
