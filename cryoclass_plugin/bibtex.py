# coding: utf-8
"""
@article{Scheres2010,
title = "Classification of structural heterogeneity by maximum-likelihood methods",
journal = "Methods in Enzymology",
volume = "482",
pages = "295 - 320",
year = "2010",
doi = "https://dx.doi.org/10.1016/S0076-6879(10)82012-9",
author = "Scheres, Sjors H.W.",
}

@article{Scheres2012a,
title = "A Bayesian view on cryo-EM structure determination",
journal = "JMB",
volume = "415",
number = "2",
pages = "406 - 418",
year = "2012",
doi = "https://dx.doi.org/10.1016/j.jmb.2011.11.010",
author = "Scheres, Sjors H.W.",
}

@article{Scheres2012b,
title = "RELION: implementation of a Bayesian approach to cryo-EM structure determination",
journal = "JSB",
volume = "180",
number = "3",
pages = "519 - 530",
year = "2012",
doi = "https://dx.doi.org/10.1016/j.jsb.2012.09.006",
author = "Scheres, Sjors H.W.",
}

@article{Kimanius2016,
title = "Accelerated cryo-EM structure determination with parallelisation using GPUs in RELION-2",
journal = "eLife",
volume = "5",
pages = "e18722",
year = "2016",
doi = "https://dx.doi.org/10.7554/eLife.18722",
author = "Kimanius, Dari and Forsberg, Bjorn O. and Scheres, Sjors H.W. and Lindahl, Erik",
}

@article{Kimanius2024,
title = "Data-driven regularization lowers the size barrier of cryo-EM structure determination",
journal = "Nature Methods",
volume = "21",
number = "7",
pages = "1216 - 1221",
year = "2024",
doi = "https://dx.doi.org/10.1038/s41592-024-02304-8",
author = "Kimanius, Dari and Jamali, Kiarash and Wilkinson, Max E. and Lovestam, Sofia and Velazhahan, Vaithish and Nakane, Takanori and Scheres, Sjors H.W.",
}
"""
