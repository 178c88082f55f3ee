"""EM Lens dashboard entry point: the loaded model pair."""

import streamlit as st

from core.models import load_pair


@st.cache_resource(show_spinner="Loading the model pair ...")
def pair(base: str, finetuned: str):
    return load_pair(base, finetuned)


st.title("EM Lens")
st.json(pair("default", "none").info())
