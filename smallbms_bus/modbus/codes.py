"""Numbers on the Modbus wire, each table once: the server encodes with it, `smallbms-bus status` and the relay
boards decode with it.

- Modbus exceptions are pymodbus's `ExcCodes`; `EXCEPTIONS` adds the metric label (the spec's name) and the text
  people read.
- The enum registers of block A (register_maps/native.toml, `values`): LEDs and the balancer status. ATD, the
  bus state and the balancer reason are IntEnums of the core (bms/alarms.py) and go on the wire as they are.
"""

from __future__ import annotations

from pymodbus.constants import ExcCodes

from smallbms_bus.bms.alarms import AtdState, BalancerStatus, Led

# code -> (metric label, text)
EXCEPTIONS: dict[ExcCodes, tuple[str, str]] = {
    ExcCodes.ILLEGAL_FUNCTION: ("illegal_function", "illegal function"),
    ExcCodes.ILLEGAL_ADDRESS: ("illegal_data_address", "illegal data address"),
    ExcCodes.ILLEGAL_VALUE: ("illegal_data_value", "illegal data value"),
    ExcCodes.DEVICE_FAILURE: ("server_device_failure", "device failure"),
    ExcCodes.DEVICE_BUSY: ("server_device_busy", "device busy"),
    ExcCodes.GATEWAY_PATH_UNAVIABLE: ("gateway_path_unavailable", "gateway path unavailable"),
    ExcCodes.GATEWAY_NO_RESPONSE: ("gateway_target_no_response", "gateway target did not respond"),
}


def exception_text(code: int) -> str:
    """What a Modbus exception code means, for people ("unknown" for a code Modbus does not define)."""
    found = EXCEPTIONS.get(code)  # type: ignore[call-overload]
    return "unknown" if found is None else found[1]


def exception_label(code: int) -> str:
    """The exception's Modbus name as a metric label (exception_NN for one Modbus does not define)."""
    found = EXCEPTIONS.get(code)  # type: ignore[call-overload]
    return f"exception_{code}" if found is None else found[0]


# the `state` register: what the manual's status page shows
STATE_WAITING, STATE_ON, STATE_OFF, STATE_FIRMWARE_UPDATE, STATE_FAULT = range(5)
STATE_TEXT = {STATE_WAITING: "waiting for batteries", STATE_ON: "on", STATE_OFF: "off (mode or remote)",
              STATE_FIRMWARE_UPDATE: "firmware update", STATE_FAULT: "fault"}
ATD_TEXT = {int(atd): atd.name.lower().replace("_", "-") for atd in AtdState}  # 0 no, 1 yes, 2 pre-alarm
LED_CODES: dict[Led, int] = {Led.OFF: 0, Led.BLINKING: 1, Led.SOLID: 2}
BALANCER_CODES: dict[BalancerStatus, int] = {BalancerStatus.UNKNOWN: 0, BalancerStatus.BALANCED: 1,
                                             BalancerStatus.BALANCING: 2, BalancerStatus.IMBALANCED: 3}
LED_BY_CODE = {code: led for led, code in LED_CODES.items()}
BALANCER_BY_CODE = {code: status for status, code in BALANCER_CODES.items()}
