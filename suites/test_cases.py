"""The benchmark cases: plain decoding, every drafter and the Hugging Face peer, under
every paradigm. Each case times its whole paradigm run with pytest-benchmark, checks
that its tokens equal plain decoding's, and stores its metrics in extra_info."""


def test_baseline(specdec_session, specdec_paradigm_case, benchmark):
    record = specdec_session.run_baseline_case(specdec_paradigm_case, benchmark)
    benchmark.extra_info.update(record)
    assert record["mat"] == 1.0


def test_speculative(specdec_session, specdec_drafter, specdec_paradigm_case, benchmark):
    # run_speculative_case raises LosslessError when any output token differs
    record = specdec_session.run_speculative_case(specdec_drafter, specdec_paradigm_case, benchmark)
    benchmark.extra_info.update(record)
    assert record["lossless"] in ("exact", "near_tie")


def test_hf_peer(specdec_session, specdec_peer, specdec_paradigm_case, benchmark):
    # transformers' generate is the independent reference for our baseline: in fp32
    # run_peer_case raises PeerMismatch (a LosslessError) when any token differs; in
    # half precision a difference is labelled "differs" (generate rounds differently)
    record = specdec_session.run_peer_case(specdec_peer, specdec_paradigm_case, benchmark)
    benchmark.extra_info.update(record)
    assert record["new_tokens"] > 0
    assert record["lossless"] == "exact" or record["dtype"] in ("float16", "bfloat16")
