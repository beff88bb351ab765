"""cluster.yaml: valid for Ray's cluster launcher, and reachable from the internet by SSH only.

Ray's dashboard / Jobs API (8265) runs arbitrary code for whoever reaches it (CVE-2023-48022,
"ShadowRay") and the MLflow server has no authentication, so the security group may open nothing
but TCP 22 to addresses outside the private ranges. ``public_exposures`` checks the *effective*
rules: the two that Ray's AWS provider gives every group it creates (mirrored in
``ray_default_ingress``, which a test compares with Ray's own code) plus ``provider.security_group``'s
``IpPermissions``. It also checks the listeners the start commands open (dashboard, MLflow) against them.

Every node installs the lock file's versions (``installs_without_the_lock``), and runtime_env.yaml, which
``ray job submit`` applies to each job, installs nothing.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import shlex
from pathlib import Path
from typing import Any, Iterator, Optional

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RUNTIME_ENV_YAML = REPO / "runtime_env.yaml"
LOCK = Path("requirements") / "constraints.txt"  # relative to the project's root, here and on the nodes
CONSTRAINT_OPTIONS = ("-c", "--constraint", "--constraints")  # pip's and uv's spellings
# runtime_env keys that install packages or swap the environment for each job.
INSTALLING_RUNTIME_ENV_KEYS = {"pip", "uv", "conda", "container", "image_uri"}

SSH_PORT = 22
ALL_PORTS = (0, 65535)
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(net) for net in
                         ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# (service, program, subcommand, host option names, port option names, default host, default port);
# the defaults are those of `ray start` (dashboard: localhost:8265) and `mlflow server` (127.0.0.1:5000).
SERVICES = (
    ("Ray dashboard", "ray", "start", ("--dashboard-host",), ("--dashboard-port",), "localhost", 8265),
    ("MLflow", "mlflow", "server", ("--host", "-h"), ("--port", "-p"), "127.0.0.1", 5000),
    ("MLflow", "mlflow", "ui", ("--host", "-h"), ("--port", "-p"), "127.0.0.1", 5000),
)
SELF_GROUP = "<the cluster's own security group>"


def load_config(path: Path = CLUSTER_YAML) -> dict:
    """The parsed cluster config; a one-line error naming the file when it is not a YAML mapping."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such cluster config")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a cluster config must be a YAML mapping")
    return config


def effective_config(config: dict) -> dict:
    """The config as `ray up` uses it: Ray's AWS defaults filled in, setup commands merged."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(config))


def ray_default_ingress(group_id: str = SELF_GROUP) -> list[dict]:
    """The inbound rules Ray's AWS provider gives a security group it creates, before the config's own:
    all traffic from the group itself, and SSH from anywhere."""
    return [
        {"FromPort": -1, "ToPort": -1, "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]},
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ]


def ingress_rules(config: dict) -> list[dict]:
    """Every inbound rule of the security group `ray up` creates for this config."""
    extra = config.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    return ray_default_ingress() + list(extra)


def _is_private(cidr: str) -> bool:
    """Inside RFC 1918 / RFC 4193 space. Not ``ipaddress``'s ``is_private``, which also says yes to
    0.0.0.0/8 or 198.18.0.0/15; anything unparsable counts as public (the safe answer)."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False
    return any(net.version == private.version and net.subnet_of(private) for private in PRIVATE_NETWORKS)


def public_sources(rule: dict) -> list[str]:
    """The sources of ``rule`` outside the private ranges (prefix lists count: their contents are unknown)."""
    cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])]
    found = [cidr for cidr in cidrs if not _is_private(cidr)]
    return found + [f"prefix list {p.get('PrefixListId')}" for p in rule.get("PrefixListIds", [])]


def port_range(rule: dict) -> Optional[tuple[str, int, int]]:
    """(protocol, first port, last port) the rule opens, or None for protocols without ports (ICMP)."""
    protocol = str(rule.get("IpProtocol", "-1")).lower()
    if protocol in ("-1", "all"):
        return ("all", *ALL_PORTS)
    if protocol not in ("tcp", "udp", "6", "17"):
        return None
    protocol = {"6": "tcp", "17": "udp"}.get(protocol, protocol)
    first, last = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if first in (-1, None):
        return (protocol, *ALL_PORTS)
    return (protocol, int(first), int(last))


def unchecked_security_groups(config: dict) -> dict[str, list[str]]:
    """Node types launched into existing groups (``SecurityGroupIds``): rules the config does not show."""
    return {name: node["node_config"]["SecurityGroupIds"]
            for name, node in config.get("available_node_types", {}).items()
            if node.get("node_config", {}).get("SecurityGroupIds")}


def reachable_from_outside(config: dict, port: int) -> bool:
    """Whether a public source can reach TCP ``port`` (always assumed when some group is unchecked)."""
    if unchecked_security_groups(config):
        return True
    for rule in ingress_rules(config):
        opened = port_range(rule)
        if opened and opened[0] in ("tcp", "all") and opened[1] <= port <= opened[2] and public_sources(rule):
            return True
    return False


def _shell_tokens(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: fall back to plain words
        return command.split()


def _option(args: list[str], names: tuple[str, ...], default: Any) -> Any:
    """The value of ``--name value`` or ``--name=value`` in ``args``, else ``default``."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1:]
    return default


def commands(config: dict) -> Iterator[str]:
    """Every shell command in the config: top-level ``*_commands`` and per node type."""
    sections = [config] + list(config.get("available_node_types", {}).values())
    for section in sections:
        for key, value in section.items():
            if key.endswith("_commands") and isinstance(value, list):
                yield from (cmd for cmd in value if isinstance(cmd, str))


def invocations_in(command: str, program: str, subcommand: str) -> Iterator[list[str]]:
    """The arguments of each ``<program> <subcommand> ...`` in one shell command (up to ``&&``, ``;``...)."""
    tokens = _shell_tokens(command)
    for i in range(len(tokens) - 1):
        if Path(tokens[i]).name == program and tokens[i + 1] == subcommand:
            args = []
            for token in tokens[i + 2:]:
                if token in SHELL_SEPARATORS:
                    break
                args.append(token)
            yield args


def invocations(config: dict, program: str, subcommand: str) -> Iterator[list[str]]:
    """``invocations_in`` over every command of the config."""
    for command in commands(config):
        yield from invocations_in(command, program, subcommand)


def listeners(config: dict) -> list[tuple[str, str, int]]:
    """(service, host, port) of the head's dashboard and of every MLflow server the commands start."""
    found = []
    for service, program, sub, host_names, port_names, default_host, default_port in SERVICES:
        for args in invocations(config, program, sub):
            if program == "ray" and "--head" not in args:
                continue
            host = _option(args, host_names, default_host)
            found.append((service, host, int(_option(args, port_names, default_port))))
    return found


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a shell expression or a name: cannot be proved local
        return False


def public_exposures(config: dict) -> list[str]:
    """Everything in ``config`` that the internet could reach besides SSH; empty when there is none."""
    problems = [f"node type {name!r} uses existing security groups {ids}: their inbound rules are not "
                "in the config and cannot be checked"
                for name, ids in unchecked_security_groups(config).items()]
    for rule in ingress_rules(config):
        opened, sources = port_range(rule), public_sources(rule)
        if opened is None or not sources or opened == ("tcp", SSH_PORT, SSH_PORT):
            continue
        protocol, first, last = opened
        ports = str(first) if first == last else f"{first}-{last}"
        problems.append(f"inbound {protocol} {ports} is open to {', '.join(sources)}: only SSH (22) may be")
    for service, host, port in listeners(config):
        if not _is_loopback(host) and reachable_from_outside(config, port):
            problems.append(f"{service} listens on {host}:{port} and port {port} is reachable from outside")
    return problems


def project_dir_on_nodes(config: dict) -> str:
    """Where file_mounts puts the repository (the entry whose source is ``.``) on every node."""
    return next(target for target, source in config.get("file_mounts", {}).items() if source in (".", "./"))


def pip_installs(config: dict) -> Iterator[list[str]]:
    """The arguments of every ``pip install``, ``python -m pip install`` and ``uv pip install``."""
    return invocations(config, "pip", "install")


def installs_without_the_lock(config: dict) -> list[str]:
    """Each package install in the config's commands that is not constrained by the project's lock file
    on the node (``-c <project dir>/requirements/constraints.txt``): such an install can put other versions
    on a node than the driver and CI have. Empty when there is none."""
    lock = f"{project_dir_on_nodes(config).rstrip('/')}/{LOCK.as_posix()}"
    return ["pip install " + " ".join(args) for args in pip_installs(config)
            if _option(args, CONSTRAINT_OPTIONS, None) != lock]


# ---------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def config() -> dict:
    return load_config()


def with_ingress(config: dict, *rules: dict) -> dict:
    bad = copy.deepcopy(config)
    bad["provider"].setdefault("security_group", {}).setdefault("IpPermissions", []).extend(rules)
    return bad


def test_cluster_yaml_matches_rays_schema(config):
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    assert errors == []


def test_rays_own_validation_accepts_it_without_cloud_credentials(config):
    from ray.autoscaler._private.util import validate_config

    prepared = effective_config(config)
    validate_config(prepared)
    # Ray's defaults did not replace our start commands (its own open the dashboard on 0.0.0.0).
    assert prepared["head_start_ray_commands"] == config["head_start_ray_commands"]


@pytest.mark.parametrize("node_type, change, error", [
    (None, {"gpu_count": 8}, jsonschema.ValidationError),  # a key the schema does not know
    ("gpu_a10g", {"min_workers": 30}, ValueError),  # more than the global max_workers
    ("gpu_a10g", {"resources": {"GPU": 0.5}}, jsonschema.ValidationError),  # resources are integers
])
def test_rays_validation_rejects_a_broken_copy(config, node_type, change, error):
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(config)
    (bad["available_node_types"][node_type] if node_type else bad).update(change)
    with pytest.raises(error):
        validate_config(effective_config(bad))


def test_nothing_but_ssh_is_reachable_from_outside(config):
    assert {service for service, _, _ in listeners(config)} == {"Ray dashboard", "MLflow"}
    assert public_exposures(config) == []
    assert public_exposures(effective_config(config)) == []


@pytest.mark.parametrize("rules, expected", [
    ([{"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
     ["inbound tcp 8265 is open to 0.0.0.0/0", "Ray dashboard listens on 0.0.0.0:8265"]),
    ([{"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}],
     ["inbound tcp 5000 is open to ::/0", "MLflow listens on 0.0.0.0:5000"]),
    # Half the internet, and a range ipaddress.is_private calls private.
    ([{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/1"}, {"CidrIp": "198.18.0.0/15"}]}],
     ["inbound all 0-65535 is open to 0.0.0.0/1, 198.18.0.0/15", "Ray dashboard", "MLflow"]),
    ([{"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}],
     ["inbound tcp 0-65535 is open to 203.0.113.0/24"]),
    ([{"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "PrefixListIds": [{"PrefixListId": "pl-1234"}]}],
     ["open to prefix list pl-1234", "Ray dashboard listens on 0.0.0.0:8265"]),
])
def test_public_exposures_reports_a_bad_copy(config, rules, expected):
    problems = "\n".join(public_exposures(with_ingress(config, *rules)))
    for fragment in expected:
        assert fragment in problems


def test_public_exposures_reports_listeners_behind_unchecked_groups(config):
    bad = copy.deepcopy(config)
    bad["available_node_types"]["head"]["node_config"]["SecurityGroupIds"] = ["sg-0123456789abcdef0"]
    problems = public_exposures(bad)
    assert any("'head' uses existing security groups" in p for p in problems)
    assert any(p.startswith("Ray dashboard listens on 0.0.0.0:8265") for p in problems)
    assert any(p.startswith("MLflow listens on 0.0.0.0:5000") for p in problems)

    # The same groups with both services on the loopback: only the unchecked groups remain.
    bad["head_start_ray_commands"] = [
        cmd.replace("--dashboard-host=0.0.0.0", "--dashboard-host=127.0.0.1").replace("--host 0.0.0.0", "--host 127.0.0.1")
        for cmd in bad["head_start_ray_commands"]]
    assert len(public_exposures(bad)) == 1


def test_public_exposures_allows_private_sources(config):
    vpc_only = {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]}
    icmp = {"IpProtocol": "icmp", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    assert public_exposures(with_ingress(config, vpc_only, icmp)) == []


def test_ray_default_ingress_is_what_ray_creates():
    pytest.importorskip("boto3")  # ray's AWS module imports it
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    extra = [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}]
    assert _create_default_inbound_rules({"sg-1"}, extra) == ray_default_ingress("sg-1") + extra


def test_workers_scale_from_zero_and_head_has_no_gpu(config):
    head = config["head_node_type"]
    types = config["available_node_types"]
    assert types[head]["resources"]["GPU"] == 0
    workers = {name: node for name, node in types.items() if name != head}
    assert any(node["resources"].get("GPU", 0) > 0 for node in workers.values())
    for name, node in workers.items():
        assert node["min_workers"] == 0, name
        assert 1 <= node["max_workers"] <= config["max_workers"], name
        assert node["resources"]["CPU"] > 0, name
    assert config["idle_timeout_minutes"] > 0


def test_token_auth_is_on_for_every_ray_node(config):
    starts = [cmd for cmd in commands(config) if next(invocations_in(cmd, "ray", "start"), None) is not None]
    assert len(starts) == 2  # head and workers
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert not any("RAY_AUTH_MODE=disabled" in cmd for cmd in commands(config))
    # The token file every node reads, copied from the submitting machine.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_mlflow_state_outlives_the_head_node(config):
    servers = list(invocations(config, "mlflow", "server"))
    assert len(servers) == 1
    backend = _option(servers[0], ("--backend-store-uri",), "")
    artifacts = _option(servers[0], ("--artifacts-destination",), "")
    assert backend.startswith("sqlite:////mnt/shared/") or backend.startswith("postgresql")
    assert artifacts.startswith("/mnt/shared/") or artifacts.startswith("s3://")
    assert any("/mnt/shared" in cmd and "mount -t nfs4" in cmd for cmd in config["setup_commands"])


def test_every_node_installs_the_project_from_the_lock_file(config):
    assert (REPO / LOCK).is_file()
    assert installs_without_the_lock(config) == []
    assert installs_without_the_lock(effective_config(config)) == []  # with Ray's defaults merged in
    # The project itself, on every node (setup_commands run on head and workers alike).
    project = project_dir_on_nodes(config)
    setup = {"setup_commands": config["setup_commands"]}
    assert any(_option(args, ("-e", "--editable"), None) == project for args in pip_installs(setup))


@pytest.mark.parametrize("command", [
    '~/.local/bin/uv pip install -q "ray[data,train,tune,default]==2.60.0" && true',  # the old setup
    "python -m pip install -c requirements/other.txt boto3",  # another constraints file
    "pip install -c ~/src/emotion-ray/requirements/constraints.txt -e ~/src/emotion-ray; pip install -U boto3",
])
def test_installs_without_the_lock_reports_a_bad_copy(config, command):
    bad = copy.deepcopy(config)
    bad["head_setup_commands"].append(command)
    assert len(installs_without_the_lock(bad)) == 1


def test_runtime_env_installs_nothing():
    """`ray job submit --runtime-env runtime_env.yaml` applies it to every job: a package list would
    build another environment (torch included) per job, with versions other than the lock's."""
    runtime_env = yaml.safe_load(RUNTIME_ENV_YAML.read_text())
    assert isinstance(runtime_env, dict)
    assert INSTALLING_RUNTIME_ENV_KEYS & set(runtime_env) == set()
