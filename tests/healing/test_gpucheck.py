"""The GPU check parser on realistic nvidia-smi / kernel log output."""

from nomadscale.healing.gpucheck import (
    encode_meta,
    evaluate,
    parse_query_gpu,
    parse_remapped_rows,
    parse_xid,
    verdict_from_meta,
)

HEALTHY_L4 = "0, GPU-5f1c2a9e-8d7b-4c3a-9e21-0a1b2c3d4e5f, NVIDIA L4, 0, 0, 0\n"
EIGHT_A100 = "".join(
    f"{i}, GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd, NVIDIA A100-SXM4-40GB, 3, 0, 0\n"
    for i in range(8)
)
T4_NO_ECC = "0, GPU-11112222-3333-4444-5555-666677778888, Tesla T4, [N/A], [N/A], [N/A]\n"
REMAP_OK = (
    "gpu_bus_id, gpu_uuid, remapped_rows.correctable, remapped_rows.uncorrectable, "
    "remapped_rows.pending, remapped_rows.failure\n"
    "00000000:00:04.0, GPU-5f1c2a9e-8d7b-4c3a-9e21-0a1b2c3d4e5f, 0, 0, No, No\n"
)
REMAP_PENDING = REMAP_OK.replace("0, 0, No, No", "0, 1, Yes, No")
REMAP_FAILED = REMAP_OK.replace("0, 0, No, No", "0, 512, No, Yes")
XID_79 = (
    "Nov 22 01:58:03 gpu-a-0001 kernel: NVRM: Xid (PCI:0000:00:04): 79, pid=2817, "
    "GPU has fallen off the bus.\n"
    "Nov 22 01:58:03 gpu-a-0001 kernel: NVRM: GPU 0000:00:04.0: GPU has fallen off the bus.\n"
)
XID_13 = (
    "[Sat Nov 22 01:12:44 2025] NVRM: Xid (PCI:0000:00:04): 13, pid=31337, name=python3, "
    "Graphics SM Warp Exception on (GPC 0, TPC 1, SM 0): Out Of Range Address\n"
)
XID_48 = (
    "[  812.331442] NVRM: Xid (PCI:0000:3b:00): 48, pid='<unknown>', name=<unknown>, "
    "An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer.\n"
)


def test_healthy_l4() -> None:
    v = evaluate(query_gpu=HEALTHY_L4, remapped_rows=REMAP_OK, xid="", expected_gpus=1)
    assert v.healthy and v.gpus == 1 and v.reasons == () and v.warnings == ()
    assert "healthy: 1 GPU" in v.explain()


def test_eight_gpus_parsed_with_counts() -> None:
    gpus = parse_query_gpu(EIGHT_A100)
    assert [g.index for g in gpus] == list(range(8))
    assert gpus[3].ecc_corrected_volatile == 3 and gpus[3].name == "NVIDIA A100-SXM4-40GB"
    assert evaluate(query_gpu=EIGHT_A100, expected_gpus=8).healthy


def test_missing_gpu_is_unhealthy() -> None:
    seven = "".join(EIGHT_A100.splitlines(keepends=True)[:7])
    v = evaluate(query_gpu=seven, expected_gpus=8)
    assert not v.healthy and "7 GPU(s) visible, expected 8" in v.reasons


def test_na_ecc_is_a_warning_not_a_failure() -> None:
    v = evaluate(query_gpu=T4_NO_ECC, remapped_rows="[Not Supported]\n", expected_gpus=1)
    assert v.healthy
    assert any("ECC counters not available" in w for w in v.warnings)
    assert parse_query_gpu(T4_NO_ECC)[0].ecc_uncorrected_volatile is None


def test_uncorrectable_volatile_ecc_is_unhealthy() -> None:
    bad = HEALTHY_L4.replace("L4, 0, 0, 0", "L4, 17, 2, 2")
    v = evaluate(query_gpu=bad, expected_gpus=1)
    assert not v.healthy
    assert any("2 uncorrectable ECC error(s) since driver load" in r for r in v.reasons)
    assert any("lifetime" in w for w in v.warnings)


def test_row_remap_pending_and_failure() -> None:
    pending = parse_remapped_rows(REMAP_PENDING)[0]
    assert pending.pending and not pending.failure and pending.uncorrectable == 1
    v = evaluate(query_gpu=HEALTHY_L4, remapped_rows=REMAP_PENDING)
    assert not v.healthy and any("row remap pending" in r for r in v.reasons)
    v = evaluate(query_gpu=HEALTHY_L4, remapped_rows=REMAP_FAILED)
    assert not v.healthy and any("row remapping failed" in r for r in v.reasons)


def test_xid_lines_parsed() -> None:
    evs = parse_xid(XID_79 + XID_13 + XID_48)
    assert [(e.code, e.bus) for e in evs] == [
        (79, "PCI:0000:00:04"),
        (13, "PCI:0000:00:04"),
        (48, "PCI:0000:3b:00"),
    ]
    assert evs[0].pid == "2817" and evs[0].text == "GPU has fallen off the bus."
    assert evs[1].text.startswith("Graphics SM Warp Exception")
    assert evs[2].pid == "<unknown>"


def test_critical_xid_unhealthy_app_xid_warning() -> None:
    v = evaluate(query_gpu=HEALTHY_L4, xid=XID_79, expected_gpus=1)
    assert not v.healthy and any("Xid 79" in r and "fallen off the bus" in r for r in v.reasons)
    v = evaluate(query_gpu=HEALTHY_L4, xid=XID_13 * 3, expected_gpus=1)
    assert v.healthy and len(v.warnings) == 1 and "often app-caused" in v.warnings[0]


def test_smi_failure_is_unhealthy() -> None:
    out = (
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
        "Make sure that the latest NVIDIA driver is installed and running.\n"
    )
    v = evaluate(query_gpu=out, expected_gpus=1)
    assert not v.healthy and v.gpus == 0 and "nvidia-smi query failed" in v.reasons[0]
    v = evaluate(query_gpu="No devices were found\n", expected_gpus=1)
    assert not v.healthy and "0 GPU(s) visible, expected 1" in v.reasons


def test_garbage_fields_are_unhealthy() -> None:
    v = evaluate(query_gpu="0, GPU-x, L4, lots, 0, 0\n")
    assert not v.healthy and "not a count" in v.reasons[0]


def test_meta_round_trip() -> None:
    meta = encode_meta("abc123", query_gpu=HEALTHY_L4, remapped_rows=REMAP_OK, xid=XID_79)
    assert verdict_from_meta(meta, "other", expected_gpus=1) is None
    v = verdict_from_meta(meta, "abc123", expected_gpus=1)
    assert v is not None and not v.healthy and "Xid 79" in v.reasons[0]
