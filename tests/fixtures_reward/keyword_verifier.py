"""A verifier loaded by file path in tests/test_reward_pool.py: does the answer mention the keyword?"""


def mentions_keyword(response, ground_truth, *, data_source, extra_info):
    hit = str(ground_truth).lower() in response.lower()
    return {"score": 1.0 if hit else 0.0, "length": len(response)}
