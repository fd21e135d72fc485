"""The real console in a pseudo-terminal against the real daemon and control plane.

Each test drives `python -m appliance console` with pexpect the way a user at a serial
terminal would, and checks what it prints and what it leaves on disk or in the control plane.
"""

from __future__ import annotations

import re
import shutil

import psutil
import pytest

from appliance.system import restricted

pytestmark = pytest.mark.slow

KEY = re.compile(r"Activation key: ([A-Z0-9]{5}(?:-[A-Z0-9]{5}){4})")


def test_first_login_forces_a_new_password(appliance, console_factory) -> None:
    con = console_factory(appliance.socket_path, password=None)
    con.answer("login:", "admin")
    con.answer("Password:", "password")
    con.seen("choose a new one now")
    con.answer("New password:", "short")
    con.seen("6 to 512")
    con.answer("New password:", "password")
    con.seen("cannot be the default")
    con.answer("New password:", "new-secret")
    con.answer("Retype new password:", "typo-secret")
    con.seen("do not match")
    con.answer("New password:", "new-secret")
    con.answer("Retype new password:", "new-secret")
    con.seen("Password changed")
    header = con.seen("Enter command:")
    assert "Not activated" in header and "Software version" in header
    assert '"scrypt"' in con.password_file.read_text()
    con.send("x")  # log out: back to the login prompt, not to a shell
    con.answer("login:", "admin")
    con.answer("Password:", "password")  # the default no longer works
    con.seen("Login incorrect")
    con.login("new-secret")


COMBOS = [
    pytest.param(net, endpoint, ipv, id=f"{net}-{endpoint}-{ipv or 'na'}")
    for net in ("public", "vpc")
    for endpoint, ipv in (("standard", None), ("dualstack", "ipv4"), ("dualstack", "ipv6"))
]


@pytest.mark.parametrize(("network", "endpoint", "ip_version"), COMBOS)
def test_activation_key_accepted_by_control_plane(
    control_plane, appliance, console_factory, wait_until, network, endpoint, ip_version
) -> None:
    """Each combination: a fresh daemon (one identity activates once), the console's key,
    then the real AWS CLI's create-gateway with that key."""
    region = "eu-west-2"
    vpce = f"vpce-0123456789abcdef0-abcd1234.backup-gateway.{region}.vpce.amazonaws.com"
    con = console_factory(appliance.socket_path)
    con.login()
    con.send("0")
    con.answer("Select gateway family:", "2")
    con.answer("Enter the AWS Region", region)
    con.answer("Select network type:", "2" if network == "vpc" else "1")
    if network == "vpc":
        con.answer("VPC endpoint DNS name:", vpce)
    con.answer("Select endpoint type:", "2" if endpoint == "dualstack" else "1")
    if endpoint == "dualstack":
        con.answer("Select IP version:", "1" if ip_version == "ipv4" else "2")
    con.expect(KEY)
    key = con.child.match.group(1)
    shown = con.seen("Press Return")
    assert f"Region:         {region}" in shown and "UTC" in shown
    con.send("")
    created = control_plane.aws(
        "create-gateway", "--activation-key", key, "--gateway-display-name", "console-test",
        "--gateway-type", "BACKUP_VM", region=region,
    )
    arn = created["GatewayArn"]
    assert arn.startswith(f"arn:aws:backup-gateway:{region}:")
    gateway = control_plane.aws("get-gateway", "--gateway-arn", arn, region=region)["Gateway"]
    if network == "vpc":
        assert gateway.get("VpcEndpoint") == vpce
    else:
        assert not gateway.get("VpcEndpoint")
    wait_until(lambda: appliance.status()["activated"], 15, "the daemon to learn of activation")
    con.seen("Enter command:")
    con.send("z")  # any redraw of the main menu shows the new header
    con.seen("is not a choice")
    header = con.seen("Enter command:")
    assert "console-test" in header and arn[:60] in header.replace("\r", "")
    con.send("0")  # no second key for an activated gateway
    con.seen("already activated")


def test_bad_input_reprompts_with_a_message(appliance, console_factory) -> None:
    con = console_factory(appliance.socket_path)
    con.answer("login:", "admin")
    con.answer("Password:", "wrong")
    con.seen("Login incorrect")
    con.login()
    con.send("9")  # menus 0-8 and x exist
    con.seen("'9' is not a choice: enter one of 0, 1, 2, 3, 4, 5, 6, 7, 8, x")
    con.send("0")
    con.answer("Select gateway family:", "1")
    con.seen("'1' is not a choice: enter one of 2")
    con.answer("Select gateway family:", "2")
    con.answer("Enter the AWS Region", "not a region!")
    con.seen("is not a region code")
    con.answer("Enter the AWS Region", "xx-nowhere-9")
    con.seen("fall back to us-east-1")
    con.answer("[y/n]", "maybe")
    con.seen("answer y or n")
    con.answer("[y/n]", "y")
    con.seen("Region: us-east-1")
    con.answer("Select network type:", "2")
    con.answer("VPC endpoint DNS name:", "https://vpce.example/")
    con.seen("DNS name only")
    con.child.sendcontrol("c")  # leave the flow: no key requested
    con.seen("Enter command:")
    assert appliance.status()["registered"] is False


def test_ctrl_c_and_ctrl_d_never_reach_a_shell(appliance, console_factory, wait_until) -> None:
    con = console_factory(appliance.socket_path)
    con.seen("login:")
    con.child.sendcontrol("c")
    con.seen("login:")
    con.child.sendcontrol("d")
    con.answer("login:", "admin")
    con.answer("Password:", con.PASSWORD)
    con.seen("Enter command:")
    for control in ("c", "d"):
        con.child.sendcontrol(control)  # top level: stays in the menu
        con.seen("Enter command:")
        con.send("2")  # a submenu: back to the main menu
        con.seen("Network configuration")
        con.seen("Enter command:")
        con.child.sendcontrol(control)
        con.seen("Get activation key")
        con.seen("Enter command:")
        con.send("6")  # the restricted prompt: back to the main menu
        con.seen("Appliance#")
        con.child.sendcontrol(control)
        con.seen("Get activation key")
        con.seen("Enter command:")
    con.send("6")  # Ctrl-C stops a running command, not the console
    con.answer("Appliance#", "ip monitor link")
    console_proc = psutil.Process(con.child.pid)
    wait_until(lambda: [p for p in console_proc.children() if p.name() == "ip"], 10,
               "ip monitor to start")
    con.child.sendcontrol("c")
    con.answer("Appliance#", "h")
    con.seen("ncport HOST PORT")
    con.answer("Appliance#", "exit")
    con.seen("Enter command:")
    con.child.sendcontrol("\\")  # SIGQUIT is ignored too
    con.child.sendcontrol("z")
    con.send("echo M$((6*7))")
    con.seen("is not a choice")
    con.seen("Enter command:")
    assert con.child.isalive()
    assert "M42" not in con.transcript.read_text()


def test_restricted_prompt_refuses_shell_syntax(appliance, console_factory) -> None:
    con = console_factory(appliance.socket_path)
    con.login()
    con.send("6")
    con.answer("Appliance#", "bash")
    con.seen("Unknown command 'bash'")
    con.answer("Appliance#", "ping -c 1 127.0.0.1; id")
    con.seen("not a shell")
    con.answer("Appliance#", "dig $(id)")
    con.seen("not a shell")
    con.answer("Appliance#", "h")
    con.seen("ncport HOST PORT")
    con.answer("Appliance#", "man ncport")
    con.seen("test that a TCP port accepts connections")
    con.answer("Appliance#", f"ncport 127.0.0.1 {appliance.port}")
    con.seen(f"port {appliance.port} [tcp] succeeded")
    con.answer("Appliance#", "ip -o link show lo")
    con.seen("LOOPBACK")
    if shutil.which("ping", path=restricted.SAFE_PATH):
        con.answer("Appliance#", "ping -c 1 127.0.0.1")
        con.seen("1 packets transmitted")
    else:
        con.answer("Appliance#", "ping -c 1 127.0.0.1")
        con.seen("ping is not installed on this appliance")
    con.answer("Appliance#", "passwd")
    con.answer("Current password:", "not-it")
    con.seen("wrong password; not changed")
    con.answer("Appliance#", "passwd")
    con.answer("Current password:", con.PASSWORD)
    con.answer("New password:", "another-secret")
    con.answer("Retype new password:", "another-secret")
    con.seen("Password changed")
    con.answer("Appliance#", "exit")
    con.seen("Enter command:")
    assert "uid=" not in con.transcript.read_text()
    con.send("x")
    con.answer("login:", "admin")
    con.answer("Password:", "another-secret")
    con.seen("Enter command:")


def test_network_static_config_written_after_apply(appliance, console_factory) -> None:
    con = console_factory(appliance.socket_path)
    con.login()
    con.send("2")
    con.answer("Enter command:", "3")
    con.expect(["Select adapter:", "Adapter: "])
    if "Select adapter" in con.child.after:
        con.send("1")
    con.answer("Configure a static IPv4 address [y/n]:", "y")
    con.answer("IPv4 address/prefix", "10.20.30.400/24")
    con.seen("is not an IPv4 address/prefix")
    con.answer("IPv4 address/prefix", "10.20.30.40")
    con.seen("prefix length")
    con.answer("IPv4 address/prefix", "10.20.30.40/24")
    con.answer("IPv4 default gateway", "10.20.99.1")
    con.seen("not in the adapter's subnet 10.20.30.0/24")
    con.answer("IPv4 default gateway", "10.20.30.1")
    con.answer("Configure a static IPv6 address [y/n]:", "y")
    con.answer("IPv6 address/prefix", "2001:db8::40/64")
    con.answer("IPv6 default gateway", "")
    con.answer("Primary DNS server", "10.20.30.53")
    con.answer("Secondary DNS server", "not-an-ip")
    con.seen("is not an IPv4 or IPv6 address")
    con.answer("Secondary DNS server", "")
    con.seen("IPv4: static 10.20.30.40/24, gateway 10.20.30.1")
    con.answer("Apply config [y/n]:", "y")
    con.seen("Saved")
    con.answer("Press Return", "")
    files = list(con.networkd_dir.glob("*.network"))
    assert len(files) == 1
    text = files[0].read_text()
    assert "DHCP=no" in text and "Address=10.20.30.40/24" in text
    assert "Gateway=10.20.30.1" in text and "Address=2001:db8::40/64" in text
    assert "DNS=10.20.30.53" in text
    con.answer("Enter command:", "5")  # reset all to DHCP, but answer n first
    con.answer("Apply config [y/n]:", "n")
    con.seen("Nothing was changed")
    assert files[0].read_text() == text
    con.answer("Press Return", "")
    con.answer("Enter command:", "5")
    con.answer("Apply config [y/n]:", "y")
    con.answer("Press Return", "")
    assert "DHCP=yes" in files[0].read_text()
    con.answer("Enter command:", "4")
    con.answer("New hostname:", "bad_host!")
    con.seen("not a valid hostname")
    con.answer("New hostname:", "gw-lab-1")
    con.answer("[y/n]:", "y")
    con.answer("Press Return", "")
    assert con.hostname_file.read_text() == "gw-lab-1\n"
    con.answer("Enter command:", "7")
    con.seen("IPv4 routes")


def test_time_and_connectivity_use_the_local_ntp_server(
    appliance, console_factory, ntp
) -> None:
    con = console_factory(appliance.socket_path)
    con.login()
    con.send("5")
    con.answer("Enter command:", "2")
    con.answer("Preferred NTP server:", "127.0.0.1")
    con.answer("Secondary NTP server", "")
    con.answer("Apply config [y/n]:", "y")
    con.answer("Press Return", "")
    assert "NTP=127.0.0.1" in con.timesyncd_conf.read_text()
    ntp.offset = 420.0  # the responder's clock is 7 minutes ahead of ours
    con.answer("Enter command:", "1")
    shown = con.seen("Synchronize the time now [y/n]:")
    assert "System time (UTC):" in shown and "[WARNING]" in shown
    assert re.search(r"offset \+4[12]\d\.\d{3} s", shown)
    con.send("n")
    con.answer("Press Return", "")
    con.child.sendcontrol("c")
    ntp.offset = 0.0
    con.answer("Enter command:", "3")
    con.answer("Region to test", "us-west-2")
    con.answer("Select endpoint type:", "1")
    out = con.seen("Press Return")
    assert "[PASSED] control plane TCP" in out
    assert "[PASSED] NTP 127.0.0.1" in out
    assert ntp.requests >= 2


def test_resources_and_proxy_screens(appliance, console_factory) -> None:
    from appliance.system import resources

    errors = resources.error_count(resources.check())
    con = console_factory(appliance.socket_path)
    con.login()
    con.send("4")
    out = con.seen("Press Return")
    assert "vCPUs:" in out and "Memory:" in out and "Root disk:" in out
    con.send("")
    menu = con.seen("Enter command:")
    assert f"View system resource check ({errors} Errors)" in menu
    con.child.send("\x1b[B\x1b[B")  # arrow keys: down twice selects "1" ...
    con.seen("1: Configure HTTP proxy")
    con.send("")  # ... and Return takes it
    assert "does not support" in con.seen("Press Return")


def test_daemon_down_is_a_message_not_a_traceback(tmp_path, console_factory) -> None:
    con = console_factory(tmp_path / "no-daemon.sock")
    con.login()
    con.send("0")
    con.answer("Select gateway family:", "2")
    con.answer("Enter the AWS Region", "")
    con.answer("Select network type:", "1")
    con.answer("Select endpoint type:", "1")
    out = con.seen("Press Return")
    assert "[FAILED] the appliance daemon is not running" in out
    assert "Traceback" not in con.transcript.read_text()
