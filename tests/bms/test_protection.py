"""Protection rules of BEHAVIOUR.md (OUT, ATC, ATD, PRE, REM, COM-2, BANK-3, FW, LED) on an injected clock."""

from __future__ import annotations

import pytest

from smallbms_bus.bank import PROTECTIVE_MEMORY_S
from smallbms_bus.bms.alarms import AtdState, BmsAlarm, BmsWarning, Led
from tests.bms.rig import Rig

A, W = BmsAlarm, BmsWarning


def started(series: int = 1, parallel: int = 1, **kw) -> Rig:
    rig = Rig(series, parallel, **kw)
    rig.start()
    return rig


# -- OUT-4: fail-safe start ------------------------------------------------------------------------

def test_outputs_stay_off_until_the_bank_is_learned_and_fresh():
    rig = Rig(2, 2, discovery_window=10.0)
    d = rig.run(9.9)
    assert not d.started and d.waiting_for_batteries
    assert (d.outputs.load_disconnect, d.outputs.charge_disconnect, d.outputs.pre_alarm) == (False, False, False)
    assert d.alarms == A(0) and d.reasons["ATC"] == "waiting for batteries"
    d = rig.run(0.3)
    assert d.started and d.outputs.load_disconnect and d.outputs.charge_disconnect


def test_no_batteries_after_the_grace_raises_bank_configuration_and_outputs_stay_off():
    rig = Rig(1, 1)
    rig.batteries[0].silent = True
    d = rig.run(59.9)
    assert d.alarms == A(0) and d.waiting_for_batteries
    d = rig.run(0.2)
    assert A.BANK_CONFIGURATION in d.alarms and not d.outputs.load_disconnect and not d.started
    assert "no battery heard" in d.reasons["BANK_CONFIGURATION"]


def test_a_bad_bank_never_starts():
    rig = Rig(1, 2)
    rig.battery(2).capacity = 200
    d = rig.run(5)
    assert not d.started and A.BANK_CONFIGURATION in d.alarms
    assert "mixed capacity" in d.reasons["BANK_CONFIGURATION"]
    assert not d.atc and not d.atd


# -- ATC-1: cell high voltage, by value and by flag -------------------------------------------------------

@pytest.mark.parametrize(("volts", "alarm"), [(3.749, False), (3.750, True), (3.751, True)])
def test_cell_high_voltage_set_level(volts, alarm):
    rig = started()
    rig.battery(1).cells[2] = volts
    d = rig.tick()
    assert (A.CELL_HIGH_VOLTAGE in d.alarms) is alarm
    assert d.atc is not alarm and d.outputs.charge_disconnect is not alarm
    assert d.atd and d.outputs.load_disconnect  # discharging stays allowed


@pytest.mark.parametrize(("volts", "cleared"), [(3.601, False), (3.600, True), (3.599, True)])
def test_cell_high_voltage_clear_level(volts, cleared):
    rig = started()
    rig.battery(1).cells[0] = 3.76
    rig.tick()
    rig.battery(1).cells[0] = volts
    d = rig.run(PROTECTIVE_MEMORY_S)  # the 3.76 V frame counts for 2 s (protective memory)
    assert (A.CELL_HIGH_VOLTAGE not in d.alarms) is cleared and d.atc is cleared


def test_a_latch_releases_only_once_every_frame_of_the_last_2_s_is_clean():
    """Protective memory (COM-6 defence): the release waits until the last frame past the set level is
    PROTECTIVE_MEMORY_S old, so a clean frame from a second sender between two of the battery's cannot release it."""
    rig = started()
    rig.battery(1).cells[0] = 3.76
    assert not rig.tick().atc
    last_high = rig.t
    rig.battery(1).cells[0] = 3.40
    d = rig.run(PROTECTIVE_MEMORY_S - 0.1)
    assert not d.atc and d.bank.aggregates.max_cell.voltage == 3.40  # the latest frame alone would release
    assert d.bank.aggregates.recent_max_cell.voltage == 3.76
    d = rig.tick()
    assert rig.t - last_high == pytest.approx(PROTECTIVE_MEMORY_S) and d.atc
    assert A.CELL_HIGH_VOLTAGE not in d.alarms


def test_cell_high_voltage_flag_alone_and_it_holds_until_the_flag_clears():
    rig = started(2, 1)
    rig.battery(2).flags["cell_high_voltage"] = True
    d = rig.tick()
    assert A.CELL_HIGH_VOLTAGE in d.alarms and not d.atc
    assert "battery 2 reports CellHighVoltage" in d.reasons["CELL_HIGH_VOLTAGE"]
    rig.battery(2).flags["cell_high_voltage"] = False
    assert not rig.run(PROTECTIVE_MEMORY_S - 0.1).atc  # the flag counts for 2 s after the last frame with it
    assert rig.tick().atc
    assert {("CELL_HIGH_VOLTAGE", "raised"), ("CELL_HIGH_VOLTAGE", "cleared")} <= set(rig.event_names())


# -- ATC-2, ATC-3: charge temperatures ----------------------------------------------------------------------

@pytest.mark.parametrize(("low", "blocked"), [(5.1, False), (5.0, False), (4.9, True)])
def test_low_temperature_charge_set(low, blocked):
    rig = started()
    rig.battery(1).temps = (low, 20.0)
    d = rig.tick()
    assert (A.LOW_TEMPERATURE_CHARGE in d.alarms) is blocked and d.atc is not blocked and d.atd


@pytest.mark.parametrize(("low", "cleared"), [(5.9, False), (6.0, True), (6.1, True)])
def test_low_temperature_charge_clear(low, cleared):
    rig = started()
    rig.battery(1).temps = (4.0, 20.0)
    rig.tick()
    rig.battery(1).temps = (low, 20.0)
    assert rig.run(PROTECTIVE_MEMORY_S).atc is cleared


@pytest.mark.parametrize(("high", "blocked"), [(49.9, False), (50.0, False), (50.1, True)])
def test_high_temperature_charge_set(high, blocked):
    rig = started()
    rig.battery(1).temps = (20.0, high)
    d = rig.tick()
    assert (A.HIGH_TEMPERATURE_CHARGE in d.alarms) is blocked and d.atc is not blocked


@pytest.mark.parametrize(("high", "cleared"), [(48.1, False), (48.0, True), (47.9, True)])
def test_high_temperature_charge_clear(high, cleared):
    rig = started()
    rig.battery(1).temps = (20.0, 51.0)
    rig.tick()
    rig.battery(1).temps = (20.0, high)
    assert rig.run(PROTECTIVE_MEMORY_S).atc is cleared


def test_discharge_temperature_warning_with_hysteresis():
    rig = started()
    rig.battery(1).temps = (-20.1, 10.0)
    assert W.DISCHARGE_TEMPERATURE in rig.tick().warnings
    rig.battery(1).temps = (-19.5, 10.0)
    assert W.DISCHARGE_TEMPERATURE in rig.run(PROTECTIVE_MEMORY_S).warnings  # inside, but not 1 K inside
    rig.battery(1).temps = (-19.0, 10.0)
    assert W.DISCHARGE_TEMPERATURE not in rig.run(PROTECTIVE_MEMORY_S).warnings
    rig.battery(1).temps = (20.0, 50.1)
    assert W.DISCHARGE_TEMPERATURE in rig.tick().warnings


# -- ATC-4, FW-1, FW-2: firmware update ----------------------------------------------------------------------

def test_firmware_update_by_command_opens_charge_at_once_and_loads_after_120_s():
    rig = started()
    rig.core.firmware_update("start")
    d = rig.tick()
    assert not d.atc and d.atd and W.FIRMWARE_UPDATE_IN_PROGRESS in d.warnings and d.firmware_update
    d = rig.run(119.9)  # 119.9 s since the update started
    assert d.atd and A.FIRMWARE_UPDATE_FAILED not in d.alarms
    d = rig.tick()  # 120.0 s
    assert not d.atd and A.FIRMWARE_UPDATE_FAILED in d.alarms and not d.outputs.load_disconnect
    rig.core.firmware_update("complete")
    d = rig.tick()
    assert d.atc and d.atd and A.FIRMWARE_UPDATE_FAILED not in d.alarms


def test_a_battery_reporting_firmware_updating_is_an_update():
    rig = started(2, 1)
    rig.battery(2).flags["firmware_updating"] = True
    d = rig.tick()
    assert not d.atc and d.atd and "battery 2 reports FirmwareUpdating" in d.reasons["FIRMWARE_UPDATE_IN_PROGRESS"]
    rig.core.firmware_update("abort")  # aborting the command does not override the battery's own flag
    assert not rig.tick().atc
    rig.battery(2).flags["firmware_updating"] = False
    assert rig.run(PROTECTIVE_MEMORY_S).atc


def test_firmware_update_action_is_checked():
    with pytest.raises(ValueError, match="start, complete or abort"):
        Rig().core.firmware_update("reboot")


# -- ATC-5, ATD-3: faults ---------------------------------------------------------------------------------

def test_hardware_fault_stops_both():
    rig = started(1, 2)
    rig.battery(2).flags["hardware_fault"] = True
    d = rig.tick()
    assert A.BATTERY_FAULT in d.alarms and not d.atc and not d.atd
    assert d.reasons["BATTERY_FAULT"] == "battery 2 reports HardwareFault"


def test_an_unmeasured_cell_is_a_battery_fault():
    rig = started()
    rig.battery(1).cells[3] = None
    d = rig.tick()
    assert A.BATTERY_FAULT in d.alarms and "battery 1 cell 4 not measured" in d.reasons["BATTERY_FAULT"]
    assert not d.atc and not d.atd


def test_bank_change_after_start_raises_bank_configuration():
    rig = started(1, 2)
    rig.battery(2).serial = "HQ999999999999"  # a battery swapped without re-learning
    d = rig.tick()
    assert A.BANK_CONFIGURATION in d.alarms and not d.atc and not d.atd
    rig.core.relearn_bank(rig.t)  # BANK-4
    d = rig.tick()
    assert A.BANK_CONFIGURATION not in d.alarms and d.atc and d.atd


def test_a_battery_taken_out_and_the_bank_relearned_gives_the_outputs_back():
    """BANK-4 after a deliberate removal: the re-learned bank is the batteries on the bus; the one taken out is no
    longer a battery whose comms are lost (which would keep loads and chargers off for good)."""
    rig = started(1, 2)
    rig.battery(2).silent = True  # taken out
    d = rig.run(6.0)
    assert A.BATTERY_COMMS_LOST in d.alarms and not d.atc and not d.atd
    rig.core.relearn_bank(rig.t)  # BANK-4
    d = rig.run(2.5)  # COM-2: the bank fresh for 2 s
    assert not d.alarms and d.atc and d.atd, d.reasons
    assert d.bank.topology.batteries == 1 and [b.node for b in d.bank.batteries] == [1]


# -- COM-2, COM-4 -------------------------------------------------------------------------------------

def test_comms_loss_stops_both_at_once_and_recovers_after_2_s_fresh():
    rig = started(2, 1)
    rig.battery(2).silent = True
    d = rig.run(4.9)
    assert d.atc and d.atd  # within comm_timeout (5 s)
    d = rig.run(0.2)
    assert A.BATTERY_COMMS_LOST in d.alarms and not d.atc and not d.atd and d.pre_alarm
    assert d.reasons["BATTERY_COMMS_LOST"] == "battery 2: no BAT_STATUS for 5.1 s (comm_timeout 5 s)"
    rig.battery(2).silent = False
    d = rig.tick()
    assert A.BATTERY_COMMS_LOST in d.alarms  # fresh again, but not yet for 2 s
    d = rig.run(1.8)
    assert A.BATTERY_COMMS_LOST in d.alarms
    d = rig.run(0.2)
    assert A.BATTERY_COMMS_LOST not in d.alarms and d.atc and d.atd and not d.pre_alarm


def test_alive_counter_freeze_is_comms_loss():
    rig = started()
    rig.battery(1).alive_frozen = True
    assert rig.run(4.9).atd
    d = rig.run(0.2)
    assert A.BATTERY_COMMS_LOST in d.alarms
    assert d.reasons["BATTERY_COMMS_LOST"] == "battery 1: AliveCounter stuck for 5.1 s (comm_timeout 5 s)"


def test_link_down_is_comms_loss_at_once():
    rig = started()
    rig.core.set_link(False, "receive failed: Could not read from serial device")
    d = rig.tick()
    assert A.BATTERY_COMMS_LOST in d.alarms and not d.atd and "bus down: receive failed" in d.reasons[
        "BATTERY_COMMS_LOST"]
    rig.core.set_link(True)
    rig.run(2.1)
    assert rig.tick().atd


# -- ATD-1, PRE-1, PRE-3, PRE-4: undervoltage with the 30 s pre-alarm lead ---------------------------------

@pytest.mark.parametrize(("volts", "pre"), [(3.101, False), (3.100, True), (3.099, True)])
def test_pre_alarm_cell_level(volts, pre):
    rig = started()
    rig.battery(1).cells[1] = volts
    d = rig.tick()
    assert d.pre_alarm is pre and d.outputs.pre_alarm is pre and (W.PRE_ALARM in d.warnings) is pre
    assert d.atd and d.atd_state == (AtdState.PRE_ALARM if pre else AtdState.YES)  # PRE-4


@pytest.mark.parametrize(("level", "volts", "pre"), [
    (3.150, 3.150, True), (3.150, 3.151, False), (2.850, 2.851, False), (2.850, 2.850, True), (3.000, 3.05, False)])
def test_pre_alarm_level_is_the_setting(level, volts, pre):
    """PRE-1: "the pre-alarm level can be adjusted" (2.850-3.150 V per cell)."""
    rig = started()
    rig.core.set_settings(pre_alarm_level_per_cell=level)
    rig.battery(1).cells[1] = volts
    d = rig.tick()
    assert d.pre_alarm is pre and (W.PRE_ALARM in d.warnings) is pre
    if pre:
        assert f"<= the pre-alarm level {level:.3f} V" in d.reasons["PRE_ALARM"]


def test_an_adjusted_pre_alarm_still_clears_at_3_20():
    rig = started()
    rig.core.set_settings(pre_alarm_level_per_cell=2.9)
    rig.set_cells(2.9)
    assert rig.tick().pre_alarm
    rig.set_cells(3.19)
    assert rig.run(PROTECTIVE_MEMORY_S).pre_alarm  # above the level, below the clear level: held
    rig.set_cells(3.20)
    assert not rig.run(PROTECTIVE_MEMORY_S).pre_alarm


def test_pre_alarm_clears_at_3_20():
    rig = started()
    rig.set_cells(3.05)
    rig.tick()
    rig.set_cells(3.199)
    assert rig.run(PROTECTIVE_MEMORY_S).pre_alarm
    rig.set_cells(3.20)
    assert not rig.run(PROTECTIVE_MEMORY_S).pre_alarm


def test_undervoltage_disconnects_loads_30_s_after_the_pre_alarm_went_high():
    rig = started()
    rig.battery(1).cells[0] = 2.80
    d = rig.tick()
    assert d.pre_alarm and d.atd and A.CELL_LOW_VOLTAGE not in d.alarms  # PRE-3: pre-alarm first
    d = rig.run(29.9)  # 29.9 s after the pre-alarm went high
    assert d.atd and d.outputs.load_disconnect
    d = rig.tick()  # 30.0 s
    assert not d.atd and not d.outputs.load_disconnect and A.CELL_LOW_VOLTAGE in d.alarms
    assert d.atc and d.outputs.charge_disconnect  # charging is how the bank recovers
    assert d.atd_state == AtdState.NO


def test_undervoltage_right_after_a_long_pre_alarm_disconnects_at_once():
    rig = started()
    rig.set_cells(3.05)
    rig.run(40)
    rig.battery(1).cells[0] = 2.79
    d = rig.tick()
    assert not d.atd and A.CELL_LOW_VOLTAGE in d.alarms


def test_undervoltage_that_clears_within_the_lead_disconnects_nothing():
    rig = started()
    rig.battery(1).cells[0] = 2.79
    rig.run(20)
    rig.set_cells(3.20)
    d = rig.run(20)
    assert d.atd and A.CELL_LOW_VOLTAGE not in rig.last.alarms and ("CELL_LOW_VOLTAGE", "raised") not in \
        rig.event_names()


def test_undervoltage_latches_until_every_cell_is_back_at_3_20():
    rig = started()
    rig.battery(1).flags["cell_low_voltage"] = True
    rig.run(30.1)
    assert not rig.last.atd
    rig.battery(1).flags["cell_low_voltage"] = False
    rig.set_cells(3.199)
    assert not rig.run(PROTECTIVE_MEMORY_S).atd
    rig.set_cells(3.20)
    d = rig.run(PROTECTIVE_MEMORY_S)
    assert d.atd and A.CELL_LOW_VOLTAGE not in d.alarms


# -- ATD-2, PRE-2: SoC ---------------------------------------------------------------------------------

def test_low_soc_floor_and_warning_level():
    rig = started()
    rig.core.set_soc(20.5)
    d = rig.tick()
    assert not d.pre_alarm and d.atd
    rig.core.set_soc(20.0)  # warning level 20 %
    d = rig.tick()
    assert d.pre_alarm and W.LOW_SOC_WARNING in d.warnings and d.atd and d.atd_state == AtdState.PRE_ALARM
    rig.core.set_soc(10.0)  # discharge floor 10 %
    d = rig.tick()
    assert not d.atd and A.LOW_SOC in d.alarms and d.atc
    rig.core.set_soc(14.9)
    assert not rig.tick().atd  # clears at floor + 5
    rig.core.set_soc(15.0)
    d = rig.tick()
    assert d.atd and A.LOW_SOC not in d.alarms and W.LOW_SOC_WARNING in d.warnings
    rig.core.set_soc(25.0)
    assert W.LOW_SOC_WARNING not in rig.tick().warnings


def test_discharge_floor_zero_disables_low_soc():
    rig = started()
    rig.core.set_settings(discharge_floor_pct=0, low_soc_warning_pct=0)
    rig.core.set_soc(0.0)
    d = rig.tick()
    assert d.atd and A.LOW_SOC not in d.alarms


def test_unknown_soc_disables_soc_rules():
    rig = started()
    d = rig.tick()
    assert d.soc is None and W.SOC_UNKNOWN in d.warnings and d.atd and not d.pre_alarm


# -- OUT-1, OUT-2, OUT-3, REM-2, REM-3 ------------------------------------------------------------------

def test_mode_and_remote_gate_load_and_charge_but_not_pre_alarm():
    rig = started()
    rig.set_cells(3.05)  # pre-alarm on
    d = rig.tick()
    assert d.outputs.load_disconnect and d.outputs.charge_disconnect and d.outputs.pre_alarm
    rig.core.set_mode(False)
    d = rig.tick()
    assert (d.outputs.load_disconnect, d.outputs.charge_disconnect, d.outputs.pre_alarm) == (False, False, True)
    assert d.atc and d.atd  # ATC/ATD themselves are unchanged: the mode only gates the outputs
    rig.core.set_mode(True)
    rig.core.set_remote(False)
    d = rig.tick()
    assert (d.outputs.load_disconnect, d.outputs.charge_disconnect, d.outputs.pre_alarm) == (False, False, True)
    rig.core.set_remote(True)
    d = rig.tick()
    assert d.outputs.load_disconnect and d.outputs.charge_disconnect
    names = rig.event_names()
    assert ("MODE", "off") in names and ("MODE", "on") in names and ("REMOTE", "off") in names


def test_mode_change_bumps_the_persisted_state_revision():
    rig = started()
    before = rig.core.state_revision
    rig.core.set_mode(False)
    rig.core.set_mode(False)
    assert rig.core.state_revision == before + 1


# -- OUT-5, LED-1, LED-2 ---------------------------------------------------------------------------------

def test_relay_fault_alarm_and_error_led():
    rig = started()
    rig.core.set_soc(80)
    d = rig.tick()
    assert d.error_led == Led.OFF and d.alarms == A(0) and d.warnings == W(0)
    rig.core.set_relay_fault("load_disconnect: commanded on, read back off")
    d = rig.tick()
    assert A.RELAY_FAULT in d.alarms and d.error_led == Led.SOLID
    assert d.atc and d.atd  # the alarm informs; the outputs layer already drives its safe state
    assert d.reasons["RELAY_FAULT"] == "load_disconnect: commanded on, read back off"
    rig.core.set_relay_fault(None)
    rig.core.set_soc(18)
    d = rig.tick()
    assert d.alarms == A(0) and d.warnings == W.PRE_ALARM | W.LOW_SOC_WARNING and d.error_led == Led.BLINKING


def test_status_led_solid_while_a_modbus_client_was_seen_in_the_last_60_s():
    rig = started()
    assert rig.tick().status_led == Led.BLINKING
    rig.core.modbus_client_seen(rig.t)
    seen = rig.t
    d = rig.run(59.9 - (rig.t - seen))
    assert d.status_led == Led.SOLID
    assert rig.run(0.2).status_led == Led.BLINKING


# -- events -------------------------------------------------------------------------------------

def test_every_change_is_an_event_with_a_reason():
    rig = started()
    rig.events.clear()
    rig.battery(1).cells[0] = 3.8
    rig.tick()
    by_name = {(e.name, e.value): e for e in rig.events}
    assert by_name[("ATC", "no")].reason == "CELL_HIGH_VOLTAGE"
    assert "cell 1 of battery 1 at 3.800 V" in by_name[("CELL_HIGH_VOLTAGE", "raised")].reason
    assert by_name[("CELL_HIGH_VOLTAGE", "raised")].kind == "alarm"
    assert all(e.wall > 0 and e.now == rig.t for e in rig.events)
