"""The trio layer: the automount engine, mount helpers, async fd channels, handover."""
