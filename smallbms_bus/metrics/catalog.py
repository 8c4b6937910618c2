"""The metric catalog: every family the endpoint exports, declared once (prometheus_client's metrics_core role).

Names follow the Prometheus conventions: prefix `smallbms_`, base units in the name (volts, amperes,
watts, celsius, seconds, percent; energy in joules and charge in coulombs, as `promtool check metrics`
insists: 1 kWh = 3.6e6 J, 1 Ah = 3600 C; the Grafana dashboard shows kWh and Ah), `_total` counters,
`_info` identities (exposed as gauges of value 1, as prometheus-client writes info metrics in the text
format), 0/1 gauges for states, and a `state` label for enumerations (LEDs, balancer, bank phase: exactly
one series of each is 1). Every label value of a fixed vocabulary is lower snake case:
`alarm="cell_high_voltage"` (the alarm CELL_HIGH_VOLTAGE) beside the battery's own
`flag="cell_high_voltage"`. `METRICS` declares every family once; docs/metrics.md is generated from it
(`python -m smallbms_bus.metrics --markdown`, smallbms_bus/metrics/docs.py). The names and labels are
contracts: docs/metrics.md, the Prometheus rules and the Grafana dashboard use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from smallbms_bus.bms.alarms import BalancerReason, BmsAlarm, BmsWarning, BusState
from smallbms_bus.bms.charge import ChargeState
from smallbms_bus.bms.rules import CELL_SPREAD_IMBALANCED_V
from smallbms_bus.protocol import FLAG_FIELDS, MAX_CELLS
from smallbms_bus.vocabulary import RELAY_ROLES, BankPhase, StaleReason

PREFIX = "smallbms_"
BATTERY_LABELS = ("battery", "serial", "string", "position")
STALE_REASONS = tuple(r.value for r in StaleReason)
BATTERY_FLAGS = FLAG_FIELDS
PHASES = tuple(p.value for p in BankPhase)
OUTPUT_NAMES = RELAY_ROLES
KWH_TO_JOULES = 3.6e6
AH_TO_COULOMBS = 3600.0
CELL_NUMBERS = tuple(str(i) for i in range(1, MAX_CELLS + 1))
# alarm / warning label values: the names of docs/behaviour.md in lower case, like every other label value
ALARM_LABELS = tuple((m, (m.name or "").lower()) for m in BmsAlarm)
WARNING_LABELS = tuple((m, (m.name or "").lower()) for m in BmsWarning)


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric family. `name` is the exposed name (counters with `_total`, infos with `_info`)."""

    name: str
    kind: str  # gauge | counter | info
    labels: tuple[str, ...]
    help: str
    group: str

    @property
    def base(self) -> str:
        """The name prometheus-client's families take (without the suffix it adds)."""
        if self.kind == "counter":
            return self.name.removesuffix("_total")
        if self.kind == "info":
            return self.name.removesuffix("_info")
        return self.name


METRICS: dict[str, Spec] = {}
_group = ""


def _m(name: str, kind: str, labels: tuple[str, ...], help: str) -> str:
    full = PREFIX + name
    METRICS[full] = Spec(full, kind, labels, help, _group)
    return full


B = BATTERY_LABELS
# -- service ----------------------------------------------------------------------------------------
_group = "service"
BUILD_INFO = _m("build_info", "info", ("version",), "The running smallbms-bus version (always 1).")
DECISION_AGE = _m("decision_age_seconds", "gauge", (),
                  "Seconds since the BMS core's last evaluation (ticks every 0.1 s; growing = the core is stuck).")
STARTED = _m("bms_started", "gauge", (), "1 once the bank is known and ATC/ATD come from fresh data (OUT-4).")
WAITING = _m("waiting_for_batteries", "gauge", (), "1 while the bank is waiting for batteries (BANK-2).")
PHASE = _m("bank_phase", "gauge", ("state",), "Bank learning phase: one of waiting, discovering, learning, learned "
           "is 1.")
EVALUATIONS = _m("evaluations_total", "counter", (), "BMS core evaluations (every frame batch and every tick).")
RESTARTS = _m("task_restarts_total", "counter", (), "Crashed service tasks or decisions (each switched outputs off).")
EVENTS = _m("events_total", "counter", (), "Events (changes of ATC, ATD, pre-alarm, mode, remote, alarms, warnings).")
SCRAPES = _m("metrics_scrapes_total", "counter", (), "Scrapes this endpoint answered before this one.")
ENCODE = _m("metrics_encode_seconds", "gauge", (), "Wall time the previous scrape took to build and encode "
            "(with the pauses that let the BMS run).")
ENDPOINT_CONNECTIONS = _m("metrics_connections", "gauge", (), "Open HTTP connections to this endpoint (this scrape's "
                          "included).")
ENDPOINT_CLOSED = _m("metrics_connections_closed_total", "counter", ("reason",),
                     "HTTP connections to this endpoint closed by the service: evicted (the longest-idle, for a "
                     "newcomer over [metrics] max_connections or max_connections_per_address), refused (on accept: a "
                     "newcomer that sent nothing from an address whose share is full with one that never asked "
                     "either), no_request (nothing within first_request_timeout), idle_timeout.")
# -- states -----------------------------------------------------------------------------------------
_group = "state"
ATC = _m("allowed_to_charge", "gauge", (), "1 = allowed to charge (ATC).")
ATD = _m("allowed_to_discharge", "gauge", (), "1 = allowed to discharge (ATD; still 1 during a pre-alarm).")
PRE_ALARM = _m("pre_alarm", "gauge", (), "1 = pre-alarm active (PRE-1..3).")
MODE = _m("mode_on", "gauge", (), "1 = mode on (REM-3).")
REMOTE = _m("remote_on", "gauge", (), "1 = remote on/off input on (REM-1).")
FIRMWARE_UPDATE = _m("firmware_update", "gauge", (), "1 = firmware update mode (FW-1).")
OUTPUT = _m("output_high", "gauge", ("output",),
            "Output the BMS wants: 1 = high (load_disconnect: loads may run; charge_disconnect: chargers may run; "
            "pre_alarm: alarm).")
ALARM = _m("alarm", "gauge", ("alarm",), "1 = alarm active (an action was taken); `alarm` is its name in "
           "docs/behaviour.md in lower case (cell_low_voltage, ...).")
WARNING = _m("warning", "gauge", ("warning",), "1 = warning active; `warning` is its name in docs/behaviour.md in "
             "lower case (pre_alarm, ...).")
LED = _m("led_state", "gauge", ("led", "state"), "LED state (LED-1, LED-2): for each led one of off, blinking, "
         "solid is 1.")
BALANCER = _m("balancer_status", "gauge", ("state",), "Balancer status (BAL-1): one of unknown, balanced, "
              "imbalanced, balancing is 1.")
BALANCER_REASONS = tuple(r.label for r in BalancerReason)
BALANCER_REASON = _m("balancer_unknown_reason", "gauge", ("reason",),
                     "Why the balancer status is unknown (BAL-1, Modbus balancer_reason): one of "
                     + ", ".join(BALANCER_REASONS) + " is 1 (none while the status is known).")
# -- bank ---------------------------------------------------------------------------------------------
_group = "bank"
BANK_VOLTAGE = _m("bank_voltage_volts", "gauge", (), "Bank voltage (BANK-5).")
BANK_CURRENT = _m("bank_current_amperes", "gauge", (), "Bank current, positive = charging (BANK-5); absent while "
                  "a battery is stale.")
BANK_POWER = _m("bank_power_watts", "gauge", (), "Bank power, positive = charging; absent while a battery is stale.")
SOC = _m("bank_state_of_charge_percent", "gauge", (), "State of charge (MON-1); absent while unknown (MON-3).")
CONSUMED = _m("bank_consumed_coulombs", "gauge", (), "Charge drawn since the last full charge (MON-4; 1 Ah = 3600 C); "
              "absent while the SoC is unknown (no full charge to count from).")
TIME_REMAINING = _m("bank_time_remaining_seconds", "gauge", (),
                    "Time to the discharge floor at the 3-minute average current (MON-5); +Inf when not "
                    "discharging; absent while the SoC is unknown.")
BANK_BATTERIES = _m("bank_batteries", "gauge", (), "Batteries in the bank (BANK-1, from BAT_INFO).")
BANK_CELLS = _m("bank_cells", "gauge", (), "Cells in the bank.")
BANK_SERIES = _m("bank_batteries_in_series", "gauge", (), "Batteries per string (0 when strings are unequal).")
BANK_STRINGS = _m("bank_strings", "gauge", (), "Strings in parallel.")
BANK_NOMINAL = _m("bank_nominal_voltage_volts", "gauge", (), "Nominal bank voltage; absent when unknown.")
BANK_CAPACITY = _m("bank_capacity_coulombs", "gauge", (), "Bank capacity (BANK-5; 1 Ah = 3600 C); absent when "
                   "unknown.")
CELL_MIN = _m("bank_cell_voltage_min_volts", "gauge", (), "Lowest cell voltage of the fresh batteries.")
CELL_MAX = _m("bank_cell_voltage_max_volts", "gauge", (), "Highest cell voltage of the fresh batteries.")
CELL_T_MIN = _m("bank_cell_temperature_min_celsius", "gauge", (), "Lowest cell temperature of the fresh batteries.")
CELL_T_MAX = _m("bank_cell_temperature_max_celsius", "gauge", (), "Highest cell temperature of the fresh batteries.")
BANK_COMPLETE = _m("bank_complete", "gauge", (), "1 when every known battery is fresh (bank values cover all).")
# -- charge control (CHG): what inverters and chargers are told, the values of BMS-CAN and the Modbus maps ----------
_group = "charge"
CHARGE_STATES = tuple(s.name.lower() for s in ChargeState)  # indexed by the wire code
CHARGE_KNOWN = _m("charge_limits_known", "gauge", (), "1 once the bank's size is proven and the limits are computed "
                  "(CHG-6); 0: every limit is 0 and the voltage limits are absent.")
CVL = _m("charge_voltage_limit_volts", "gauge", (), "Charge voltage limit CVL (CHG-1, CHG-2, CHG-5); absent while "
         "the limits are not known.")
CCL = _m("charge_current_limit_amperes", "gauge", (), "Charge current limit CCL (CHG-3, CHG-6, CHG-7); 0 = do not "
         "charge.")
DCL = _m("discharge_current_limit_amperes", "gauge", (), "Discharge current limit DCL, positive (CHG-4, CHG-6, "
         "CHG-7); 0 = do not discharge.")
DVL = _m("discharge_voltage_limit_volts", "gauge", (), "Discharge voltage limit DVL, 2.80 V per cell (CHG-5); "
         "absent while the limits are not known.")
CHARGE_RATING = _m("charge_current_rating_amperes", "gauge", (), "Strings x the battery model's 1C: the most CCL and "
                   "DCL can be (CHG-3, CHG-4); absent while the limits are not known.")
CHARGE_STATE = _m("charge_state", "gauge", ("state",), "Charge state (CHG-1, persisted): one of absorption, float "
                  "is 1.")
CELL_LIMITING = _m("charge_cell_voltage_limiting", "gauge", (), "1 while CVL is held down because a cell reached "
                   "3.55 V (CHG-2).")
# -- batteries ------------------------------------------------------------------------------------------
_group = "battery"
BAT_UP = _m("battery_up", "gauge", B, "1 = the battery's readings are fresh (COM-1); 0 = stale, readings withheld.")
BAT_STALE = _m("battery_stale_reason", "gauge", (*B, "reason"),
               "1 for the reason a battery is stale (no_status, status_timeout, alive_stuck, no_info, no_temps, "
               "temps_timeout, no_cells, cells_timeout); absent while fresh.")
BAT_AGE = _m("battery_status_age_seconds", "gauge", B, "Seconds since the battery's last BAT_STATUS.")
BAT_INFO = _m("battery_info", "info", (*B, "firmware", "nominal_voltage", "capacity_ah"),
              "Battery identity from BAT_INFO and BAT_SERIAL: firmware version, nominal voltage, capacity.")
BAT_VOLTAGE = _m("battery_voltage_volts", "gauge", B, "Battery terminal voltage.")
BAT_CURRENT = _m("battery_current_amperes", "gauge", B, "Battery current, positive = charging.")
BAT_TEMP = _m("battery_temperature_celsius", "gauge", B, "Battery temperature (BAT_STATUS).")
BAT_CELL_T_MIN = _m("battery_cell_temperature_min_celsius", "gauge", B, "Lowest cell temperature (BAT_TEMPS).")
BAT_CELL_T_MAX = _m("battery_cell_temperature_max_celsius", "gauge", B, "Highest cell temperature (BAT_TEMPS).")
BAT_SPREAD = _m("battery_cell_voltage_spread_volts", "gauge", B, "Highest minus lowest cell voltage (BAL-1: "
                f"imbalanced above {CELL_SPREAD_IMBALANCED_V:.2f} V).")
BAT_FLAG = _m("battery_flag", "gauge", (*B, "flag"), "The battery's own BAT_STATUS flags, 1 = set.")
CELL_VOLTAGE = _m("cell_voltage_volts", "gauge", ("battery", "cell"), "Cell voltage (cells 1..16; an unmeasured "
                  "cell is absent).")
# -- history --------------------------------------------------------------------------------------------
_group = "history"
H_DEEPEST = _m("history_deepest_discharge_coulombs", "gauge", (), "Deepest discharge (1 Ah = 3600 C).")
H_DRAWN = _m("history_drawn_coulombs_total", "counter", (), "Cumulative charge drawn (1 Ah = 3600 C).")
H_DISCHARGED = _m("history_discharged_energy_joules_total", "counter", (), "Discharged energy (1 kWh = 3.6e6 J).")
H_CHARGED = _m("history_charged_energy_joules_total", "counter", (), "Charged energy (1 kWh = 3.6e6 J).")
H_SYNCS = _m("history_synchronisations_total", "counter", (), "Synchronisations to 100 % (MON-2).")
H_CYCLES = _m("history_charge_cycles_total", "counter", (), "Charge cycles (SoC below 65 %, later above 90 %).")
H_FULL = _m("history_full_discharges_total", "counter", (), "Full discharges (SoC reached 0 %).")
H_LAST_FULL = _m("history_last_full_charge_timestamp_seconds", "gauge", (),
                 "Unix time of the last full charge; absent if none yet.")
H_BANK_V_MIN = _m("history_bank_voltage_min_volts", "gauge", (), "Lowest bank voltage seen.")
H_BANK_V_MAX = _m("history_bank_voltage_max_volts", "gauge", (), "Highest bank voltage seen.")
H_CELL_V_MIN = _m("history_cell_voltage_min_volts", "gauge", (), "Lowest cell voltage seen.")
H_CELL_V_MAX = _m("history_cell_voltage_max_volts", "gauge", (), "Highest cell voltage seen.")
H_TEMP_MIN = _m("history_battery_temperature_min_celsius", "gauge", (), "Lowest battery temperature seen.")
H_TEMP_MAX = _m("history_battery_temperature_max_celsius", "gauge", (), "Highest battery temperature seen.")
# -- bus --------------------------------------------------------------------------------------------------
_group = "bus"
BUS_INFO = _m("bus_info", "info", ("interface", "channel"), "The battery bus (python-can interface and channel).")
BUS_UP = _m("bus_up", "gauge", (), "1 = the bus link is open and taking frames (COM-4, COM-5: down is a comms loss).")
BUS_STATES = tuple(s.name.lower() for s in BusState)
BUS_STATE = _m("bus_state", "gauge", ("state",), "The bus link: 1 for its state, one of " + ", ".join(BUS_STATES)
               + " (Modbus bus_state; stalled = BMS_STATE unsent for 1 s, COM-5).")
BUS_DOWN_REASON = _m("bus_down_reason_info", "info", ("reason",), "Why the bus link is down, as the log says it "
                     "(e.g. the serial port's error); present only while smallbms_bus_up is 0.")
BUS_RECEIVED = _m("bus_frames_received_total", "counter", (), "Frames received from the bus.")
BUS_DECODED = _m("bus_frames_decoded_total", "counter", (), "Frames decoded into battery reports.")
BUS_MALFORMED = _m("bus_frames_malformed_total", "counter", ("kind",),
                   "Frames and SLCAN lines dropped (COM-3) by kind: unknown_id, wrong_dlc, out_of_range, "
                   "not_data_frame (the DBC's checks); slcan_non_ascii, slcan_too_long, slcan_bad_length, "
                   "slcan_bad_field, slcan_unknown (a serial line that is not exactly one frame, docs/bus.md); "
                   "garbled (a frame another python-can interface could not parse).")
BUS_SENT = _m("bus_frames_sent_total", "counter", (), "Frames sent (BMS_STATE).")
BUS_SEND_ERRORS = _m("bus_send_errors_total", "counter", (), "Sends that failed with a port error (the link went "
                     "down).")
BUS_UNSENT = _m("bus_frames_unsent_total", "counter", (), "BMS_STATE frames never written: replaced by a newer one "
                "before the link could write them, or dropped while the link was down.")
BUS_STALLS = _m("bus_send_stalls_total", "counter", (), "Times BMS_STATE stayed unsent for 1 s (COM-5): the adapter "
                "or interface stopped taking frames; each also counts as a link loss.")
BUS_ADAPTER_ERRORS = _m("bus_adapter_errors_total", "counter", (), "SLCAN adapter error answers (BELL): a frame or "
                        "command the adapter refused.")
BUS_RECONNECTS = _m("bus_reconnects_total", "counter", (), "Times the link was re-opened after the first open.")
BUS_DOWNS = _m("bus_link_lost_total", "counter", (), "Times the link went down after it was up (adapter unplugged, "
               "interface down, I/O error, stall).")
# -- relay outputs ------------------------------------------------------------------------------------------
_group = "relay"
RELAY_BOARD_UP = _m("relay_board_up", "gauge", (), "1 = the relay board is open.")
RELAY_COMMANDED = _m("relay_commanded", "gauge", ("output", "channel"),
                     "Level the controller last commanded on each mapped board channel (LEDs included).")
RELAY_READ_BACK = _m("relay_read_back", "gauge", ("output", "channel"),
                     "Level read back from the board (OUT-5); absent where the board cannot read back.")
RELAY_COMMANDS = _m("relay_commands_total", "counter", (), "Channel writes to the relay board.")
RELAY_FAULTS = _m("relay_faults_total", "counter", (), "Relay fault events: I/O errors, failed opens, read-back "
                  "mismatches.")
RELAY_RECONNECTS = _m("relay_reconnects_total", "counter", (), "Successful re-opens of a lost relay board.")
# -- store ----------------------------------------------------------------------------------------------------
_group = "store"
STORE_WRITES = _m("store_writes_total", "counter", (), "State saves committed to SQLite.")
STORE_FAILURES = _m("store_write_failures_total", "counter", (), "State saves that failed (retried).")
STORE_PENDING = _m("store_pending_events", "gauge", (), "Events waiting for the next save.")
STORE_UP = _m("store_up", "gauge", (), "1 = the last save committed; 0 = saving fails (settings, mode and commands "
              "are refused, SET-3) or a save has waited more than 10 s for the disk.")
STORE_REFUSED = _m("store_writes_refused_total", "counter", (), "Writes (settings, mode, commands) refused because "
                   "the store could not commit them (Modbus exception 04).")
# -- modbus ---------------------------------------------------------------------------------------------------
_group = "modbus"
MODBUS_ENABLED = _m("modbus_enabled", "gauge", (), "1 = the Modbus TCP server runs (the families below exist only "
                    "then).")
MODBUS_REQUESTS = _m("modbus_requests_total", "counter", ("function", "outcome"),
                     "Modbus requests by function and outcome (ok, or the exception's name).")
MODBUS_REFUSED = _m("modbus_refused_writes_total", "counter", (),
                    "Writes refused because the client may not write (allow_write_from / TLS client certificate).")
MODBUS_CONNECTIONS = _m("modbus_connections", "gauge", (), "Open Modbus TCP connections.")
MODBUS_ACCEPTED = _m("modbus_connections_accepted_total", "counter", (), "Connections accepted.")
MODBUS_REFUSED_CONN = _m("modbus_connections_refused_total", "counter", (), "Connections hung up on accept: a "
                         "newcomer that had sent nothing, from an address already holding max_connections_per_address "
                         "with one that never sent a request either (it would only displace its equal).")
MODBUS_CLOSED = _m("modbus_connections_closed_total", "counter", ("reason",),
                   "Connections closed by the server: evicted (the longest-idle, for a newcomer over max_connections "
                   "or max_connections_per_address), no_request (nothing within first_request_timeout), "
                   "idle_timeout, slow_client (did not read its answers), bad_frame (not Modbus/TCP).")
# -- BMS-CAN to the inverter ([inverter], docs/inverter.md) ------------------------------------------------------
_group = "inverter"
INVERTER_ENABLED = _m("inverter_enabled", "gauge", (), "1 = [inverter] is configured (the families below exist only "
                      "then).")
INVERTER_UP = _m("inverter_bus_up", "gauge", (), "1 = the inverter bus is open.")
INVERTER_SETS = _m("inverter_frame_sets_sent_total", "counter", (), "Frame sets begun (one per [inverter] period).")
INVERTER_SENT = _m("inverter_frames_sent_total", "counter", (), "Frames written to the inverter bus.")
INVERTER_SEND_ERRORS = _m("inverter_send_errors_total", "counter", (), "Sends that failed: a full transmit queue (no "
                          "receiver acknowledging) or a port error (then the bus is re-opened with back-off).")
INVERTER_RECONNECTS = _m("inverter_reconnects_total", "counter", (), "Times the inverter bus was re-opened after the "
                         "first open.")
INVERTER_RECEIVED = _m("inverter_frames_received_total", "counter", ("kind",), "Frames received from the inverter "
                       "by kind: keepalive (0x305), identification (0x307), other (counted and ignored).")
INVERTER_GAP_MAX = _m("inverter_limits_gap_max_seconds", "gauge", (), "Longest time between two 0x351 (CVL/CCL/DCL) "
                      "frames since the start (receivers stop after 3 s; the contract is 1.5 s at most).")
INVERTER_LIMITS_AGE = _m("inverter_limits_age_seconds", "gauge", (), "Seconds since the last 0x351 went out; absent "
                         "before the first.")
INVERTER_KEEPALIVE_AGE = _m("inverter_keepalive_age_seconds", "gauge", (), "Seconds since the inverter's last "
                            "keep-alive (0x305 or 0x307); absent before the first. Warning INVERTER_SILENT when it "
                            "exceeds [inverter] keepalive_timeout.")
# -- mqtt -----------------------------------------------------------------------------------------------------
_group = "mqtt"
MQTT_CONNECTED = _m("mqtt_connected", "gauge", (), "1 = connected to the MQTT broker; 0 = not (yet), reconnecting "
                    "with back-off. Present only when [mqtt] host is set (docs/mqtt.md).")
MQTT_OUTAGES = _m("mqtt_outages_total", "counter", (), "Times the broker was lost or refused the connection "
                  "(each logged once at WARNING).")
del B
CLOSE_REASONS = ("evicted", "refused", "no_request", "idle_timeout")  # smallbms_metrics_connections_closed_total
