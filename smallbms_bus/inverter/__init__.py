"""The BMS-CAN link to inverters and chargers (docs/inverter.md): frames, the link's thread, keep-alive."""
