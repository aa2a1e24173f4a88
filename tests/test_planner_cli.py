"""`p2pserve plan`, the --devices spec and the plan file."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from p2pserve.cli import cli, main
from p2pserve.errors import ConfigError
from p2pserve.plan import Plan
from p2pserve.planner.devices import CATALOGUE, GiB, parse_devices, parse_link
from p2pserve.planner.planfile import load_plan_toml
from p2pserve.planner.shapes import resolve_model

HEXGEN = ["--model", "llama-2-70b", "--devices", "4xA6000@m1,2xA5000@m2,2xA4000@m3"]


def run_main(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# --- the --devices spec ------------------------------------------------------------------------


def test_hexgen_spec_is_eight_devices_on_three_machines():
    devices = parse_devices("4xA6000@m1,2xA5000@m2,2xA4000@m3")
    assert [d.kind.name for d in devices] == ["A6000"] * 4 + ["A5000"] * 2 + ["A4000"] * 2
    assert [d.machine for d in devices] == ["m1"] * 4 + ["m2"] * 2 + ["m3"] * 2
    assert len({d.index for d in devices}) == 8
    assert devices[0].kind.memory == 48 * GiB


def test_custom_devices_and_overrides():
    [a, b, c] = parse_devices("2xcustom(mem=24GB,tflops=35,bw=900GB/s)@m4, cpu(mem=16GB)")
    assert (a.kind.memory, a.kind.flops, a.kind.bandwidth, a.machine) == (24 * GiB, 35e12, 900e9, "m4")
    assert b.kind == a.kind and b.machine == "m4"
    assert c.kind.name == "cpu" and c.kind.memory == 16 * GiB and c.machine == "local"
    [d] = parse_devices("rtx-4090(link=50)@box")
    assert d.kind.name == "RTX4090" and d.kind.link.bandwidth == 50e9


def test_catalogue_names_are_found_case_and_punctuation_blind():
    for name in CATALOGUE:
        assert parse_devices(f"1x{name.lower()}@m")[0].kind.name == name
    assert parse_devices("a10080g")[0].kind.name == "A100-80G"


@pytest.mark.parametrize("spec, names", [
    ("4xA7000@m1", ["'4xA7000@m1'", "unknown device 'A7000'", "A6000", "custom("]),
    ("4xA6000@m1,,2xA5000@m2", ["empty entry", "COUNTxNAME"]),
    ("", ["empty entry"]),
    ("4 A6000@m1", ["'4 A6000@m1'", "COUNTxNAME"]),
    ("2xcustom(mem=24GB)@m4", ["custom devices need tflops, bw", "COUNTxNAME"]),
    ("2xcustom(mem=24GB,tflops=35,bw=fast)@m4", ["bw 'fast' is not a number"]),
    ("A6000(speed=9)@m1", ["unknown option 'speed'"]),
    ("A6000(mem=0.1GB)@m1", ["mem must be above"]),
    ("0xA6000@m1", ["count must be 1 to 4096"]),
    ("2xcustom(mem=24GB@m1", ["unbalanced parentheses"]),
])
def test_bad_device_specs_name_the_bad_part_and_the_syntax(spec, names):
    with pytest.raises(ConfigError) as e:
        parse_devices(spec)
    msg = str(e.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg


def test_links_parse_with_units():
    assert parse_link("1.25GB/s,0.5ms") == parse_link("10Gbit/s,500us")
    with pytest.raises(ConfigError, match="BANDWIDTH,LATENCY"):
        parse_link("fast")


# --- models --------------------------------------------------------------------------------------


def test_model_from_a_directory_a_config_json_or_a_name(tmp_path):
    hf = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 6, "hidden_size": 64,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert resolve_model(str(tmp_path)).n_layers == 6
    assert resolve_model(str(tmp_path / "config.json")).n_kv_heads == 2
    assert resolve_model("Llama-2-70B").n_layers == 80
    with pytest.raises(ConfigError, match="neither a directory"):
        resolve_model("llama-9-1t")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model(str(tmp_path / ".."))


# --- the command ---------------------------------------------------------------------------------


def test_plan_prints_hexgen_flags_a_table_and_the_toml():
    result = CliRunner().invoke(cli, ["plan", *HEXGEN])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "pipeline 1: --hetero-config 4 --pp-partition 80" in out
    assert "memory GiB used/avail" in out and "ms/token" in out
    assert "predicted: time to first token" in out
    assert "unused: 2xA5000@m2, 2xA4000@m3" in out
    assert "[[pipeline]]" in out and "hetero_config = [4]" in out


def test_plan_writes_a_toml_the_bootstrap_can_load(tmp_path):
    path = tmp_path / "plan.toml"
    result = CliRunner().invoke(cli, ["plan", *HEXGEN, "--objective", "throughput", "--sessions", "16",
                                      "--prompt-len", "256", "--output-len", "64", "--toml", str(path)])
    assert result.exit_code == 0, result.output
    assert f"wrote {path}" in result.output
    plans = load_plan_toml(path)
    flags = [line.split(": ", 1)[1] for line in result.output.splitlines() if line.startswith("pipeline ")]
    assert [p.flags() for p in plans] == flags
    for p in plans:
        p.check_model(resolve_model("llama-2-70b"))
    text = path.read_text()
    assert 'devices = [["A6000@m1"' in text and 'model = "llama-2-70b"' in text


def test_plan_of_a_small_model_on_cpus(tmp_path):
    result = CliRunner().invoke(cli, ["plan", "--model", "smollm2-135m", "--devices", "2xcpu(mem=2GB)@a,cpu(mem=2GB)@b",
                                      "--dtype", "fp32", "--objective", "throughput", "--sessions", "4"])
    assert result.exit_code == 0, result.output
    assert "every grouping searched" in result.output


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-2-70b", "--devices", "2xA6000@m1"],
     "error: llama-2-70b (fp16) needs 128.5 GiB for weights but the devices have 95.0 GiB usable: 33.5 GiB missing"),
    (["--model", "llama-2-70b", "--devices", "4xA7000@m1"], "error: bad --devices entry '4xA7000@m1'"),
    (["--model", "llama-2-70b", "--devices", "4xA6000@m1", "--inter-link", "9"], "error: bad link '9'"),
    (["--model", "gpt-5", "--devices", "4xA6000@m1"], "error: --model 'gpt-5' is neither"),
])
def test_plan_errors_are_one_line_and_exit_2(argv, message, capsys):
    code, out, err = run_main(["plan", *argv], capsys)
    assert code == 2
    assert err.startswith(message)
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_dtype_is_a_usage_error():
    result = CliRunner().invoke(cli, ["plan", *HEXGEN, "--dtype", "fp8"])
    assert result.exit_code == 2 and "fp8" in result.output


# --- the plan file -------------------------------------------------------------------------------


def test_plan_file_round_trips_replicas(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('model = "x"\n[[pipeline]]\nhetero_config = [2, 1]\npp_partition = [20, 10]\n'
                    'devices = [["A@m", "A@m"], ["B@n"]]\n'
                    '[[pipeline]]\nhetero_config = [1]\npp_partition = [30]\n')
    assert load_plan_toml(path) == [Plan([2, 1], [20, 10]), Plan([1], [30])]


@pytest.mark.parametrize("text, message", [
    ("model = 'x'\n", "no [[pipeline]] tables"),
    ("[[pipeline]]\nhetero_config = [2]\n", "pipeline 1: needs hetero_config"),
    ("[[pipeline]]\nhetero_config = [2]\npp_partition = [1, 2]\n", "pipeline 1: --hetero-config has 1 stages"),
    ("[[pipeline]]\nhetero_config = [2]\npp_partition = [30]\ndevices = [['a']]\n", "one device per TP rank"),
    ("[[pipeline]]\nhetero_config = [1]\npp_partition = [30]\n[[pipeline]]\nhetero_config = [1]\npp_partition = [31]\n",
     "different layer counts"),
    ("[[pipeline]\n", "not valid TOML"),
])
def test_bad_plan_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        load_plan_toml(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_plan_says_why_a_device_is_left_idle_and_takes_names_with_spaces():
    result = CliRunner().invoke(cli, ["plan", "--model", "llama-3-8b", "--devices", "2xRTX 3090@m1,1xT4@m2",
                                      "--objective", "throughput", "--sessions", "16"])
    assert result.exit_code == 0, result.output
    out = result.output
    if "unused: 1xT4@m2" in out:
        assert "  T4@m2: the best plan with it (--hetero-config" in out and "tokens/s at 16 session(s)" in out
    assert "10% of each device is kept for the KV cache" in out


def test_a_16_bit_kv_cache_fits_the_sessions_an_fp32_one_does_not():
    # an int4 model's cache is fp32 unless the workers run --kv-dtype fp16 or bf16: four
    # sessions of 2128 tokens of llama-2-13b fit beside its weights on a 4090 only at 16 bits
    args = ["plan", "--model", "llama-2-13b", "--devices", "1xRTX4090@m1", "--dtype", "int4",
            "--sessions", "4", "--prompt-len", "2000"]
    fp32 = CliRunner().invoke(cli, args)
    assert isinstance(fp32.exception, ConfigError) and "no plan fits" in str(fp32.exception)
    fp16 = CliRunner().invoke(cli, [*args, "--kv-dtype", "fp16"])
    assert fp16.exit_code == 0, fp16.output
    assert "pipeline 1: --hetero-config 1 --pp-partition 40" in fp16.output
