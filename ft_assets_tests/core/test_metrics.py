from ft_assets.core.metrics import exact_match, mean_scores, normalize, qa_scores, rouge_l, token_f1


def test_normalize_keeps_number_separators_and_drops_articles():
    assert normalize("The $4,512 million.") == "4,512 million"
    assert normalize("12.5%") == "12.5"
    assert normalize("  An   Apple ") == "apple"


def test_exact_match_and_f1():
    assert exact_match("$4,512 million", "4,512 million") == 1.0
    assert exact_match("4,512", "4,512 million") == 0.0
    assert token_f1("4,512", "4,512 million") == 2 * (1.0 * 0.5) / 1.5
    assert token_f1("revenue was 4,512 million", "4,512 million") == 2 * (0.5 * 1.0) / 1.5
    assert token_f1("", "x") == 0.0 and token_f1("", "") == 1.0
    assert token_f1("4512", "4,512") == 0.0  # a different figure is wrong


def test_rouge_l_and_means():
    assert rouge_l("cloud services", "cloud services") == 1.0
    assert 0 < rouge_l("the cloud segment", "cloud services") < 1
    rows = [qa_scores("a b", "a b"), qa_scores("c", "a b")]
    assert mean_scores(rows)["exact_match"] == 0.5
