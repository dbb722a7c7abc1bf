"""The paper's baselines, one module each, all on the one interface of :mod:`e4srec.recommender`.

``MODELS`` maps the name used in configs and tables to ``module:Class``; modules are imported
only when a model is built, so a missing optional dependency of one model never breaks another.
"""
MODELS = {
    "POP": "baselines.pop:POP",
    "BPR": "baselines.bpr:BPR",
    "GRU4Rec": "baselines.gru4rec:GRU4Rec",
    "Caser": "baselines.caser:Caser",
    "SASRec": "baselines.sasrec:SASRec",
    "BERT4Rec": "baselines.bert4rec:BERT4Rec",
    "S3-Rec": "baselines.s3rec:S3Rec",
    "CL4SRec": "baselines.cl4srec:CL4SRec",
    "ICLRec": "baselines.iclrec:ICLRec",
}
