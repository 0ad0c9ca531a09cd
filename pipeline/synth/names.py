"""Made-up identity values for synthetic patients, staff, sites and equipment.

Every value here is invented. The lists mix plain ASCII names with Latin-1 ones (``ISO_IR
100``) and a few that need UTF-8 (``ISO_IR 192``), so that character-set handling downstream
is exercised. :func:`draw_identity` picks from them with a caller-supplied
:class:`numpy.random.Generator`, so an identity is a pure function of the generator state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "INSTITUTIONS",
    "TECH_NAMES",
    "Identity",
    "Institution",
    "draw_identity",
    "draw_person",
    "specific_character_set",
]

FAMILY_NAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Taylor",
    "Anderson", "Thomas", "Moore", "Martin", "Jackson", "Thompson", "White", "Harris", "Clark",
    "Lewis", "Walker", "Hall", "Young", "King", "Wright", "Scott", "Green", "Baker", "Adams",
    "Nelson", "Carter", "Mitchell", "Roberts", "Turner", "Phillips", "Campbell", "Parker",
    "Evans", "Edwards", "Collins", "Stewart", "Morris", "Murphy", "Cook", "Rogers", "Morgan",
    "Peterson", "Cooper", "Reed", "Bailey", "Bell", "Kelly", "Howard", "Ward", "Cox", "Rivera",
    "Müller", "Schäfer", "Weiß", "Köhler", "Jäger", "Groß", "Bäcker", "Hämäläinen", "Sørensen",
    "Åberg", "Núñez", "Peña", "Muñoz", "García", "Rodríguez", "Martínez", "López", "González",
    "Fernández", "Gómez", "Pérez", "Sánchez", "Dubois", "Lefèvre", "Bérubé", "Gauthier",
    "Fontaine", "Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo",
    "Ricci", "Marino", "Greco", "De Luca", "O'Brien", "O'Connor", "McCarthy", "Van der Berg",
    "De Vries", "Jansen", "Bakker", "Visser", "Nowak", "Kowalski", "Wiśniewski", "Dąbrowski",
    "Łukasik", "Novák", "Dvořák", "Svoboda", "Nguyen", "Tran", "Kim", "Park", "Lee", "Chen",
    "Wang", "Singh", "Patel", "Khan", "Ali", "Okafor", "Mensah", "Haddad", "Cohen", "Levi",
)  # fmt: skip

GIVEN_NAMES_F: tuple[str, ...] = (
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica",
    "Sarah", "Karen", "Nancy", "Lisa", "Margaret", "Sandra", "Ashley", "Emily", "Donna",
    "Michelle", "Carol", "Amanda", "Melissa", "Deborah", "Stephanie", "Rebecca", "Laura",
    "Helen", "Anna", "Sophie", "Chloé", "Zoë", "Renée", "Hélène", "Inès", "Jürgen", "Greta",
    "Ingrid", "Astrid", "Maëlle", "Søs", "Małgorzata", "Agnieszka", "Lucía", "María", "Sofía",
    "Giulia", "Francesca", "Aoife", "Siobhán", "Mei", "Priya", "Amara", "Yara", "Noa", "Leah",
)  # fmt: skip

GIVEN_NAMES_M: tuple[str, ...] = (
    "James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas",
    "Charles", "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven",
    "Paul", "Andrew", "Joshua", "Kenneth", "Kevin", "Brian", "George", "Edward", "Ronald",
    "Jörg", "Jürgen", "Björn", "Søren", "Mikkel", "Łukasz", "Paweł", "José", "Jesús", "Andrés",
    "François", "Jérôme", "Loïc", "Luca", "Marco", "Giuseppe", "Seán", "Ciarán", "Wei", "Arjun",
    "Kwame", "Omar", "Yusuf", "Noah", "Eitan", "Tomáš", "Jiří", "Minh",
)  # fmt: skip

STREETS: tuple[str, ...] = (
    "Elm Street", "Oak Avenue", "Maple Road", "Cedar Lane", "Pine Close", "Birch Way",
    "Station Road", "Church Street", "Mill Lane", "High Street", "Park Avenue", "Lake Drive",
    "Hauptstraße", "Bahnhofstraße", "Rue de la Paix", "Calle Mayor", "Via Roma",
)  # fmt: skip

TOWNS: tuple[tuple[str, str], ...] = (
    ("Springfield", "62704"), ("Riverton", "82501"), ("Fairview", "97024"),
    ("Lakeside", "92040"), ("Oakridge", "37830"), ("Millbrook", "12545"),
    ("Greenwood", "29646"), ("Brookhaven", "11719"), ("Ashford", "06278"),
    ("Kingsbury", "NW9 7"), ("Dunmore", "18512"), ("Westfield", "07090"),
)  # fmt: skip

TECH_NAMES: tuple[str, ...] = (
    "RT^Kim", "Tech^Alex", "Jones^Sam", "Lindqvist^Eva", "Okoro^Chidi", "Brennan^Pat",
    "Hoffmann^Lena", "Duarte^Rui", "Sato^Yuki", "Wilde^Harper",
)  # fmt: skip


@dataclass(frozen=True)
class Institution:
    """A made-up imaging site: its name, address, department and station-name prefix."""

    name: str
    address: str
    department: str
    station_prefix: str
    issuer: str


INSTITUTIONS: tuple[Institution, ...] = (
    Institution(
        "St. Aurelia General Hospital", "1200 Harbour Road, Springfield", "Radiology",
        "SAGH", "SAGH",
    ),
    Institution(
        "Northgate University Medical Center", "45 College Avenue, Riverton",
        "Diagnostic Imaging", "NUMC", "NUMC",
    ),
    Institution(
        "Lakeside Community Clinic", "8 Shore Drive, Lakeside", "Imaging", "LCC", "LCC",
    ),
    Institution(
        "Klinikum Bergheide", "Am Waldrand 3, 12345 Bergheide", "Radiologie", "KBH", "KBH",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Identity:
    """One synthetic patient's identifying values, as a registration desk would type them.

    Attributes
    ----------
    family, given, middle:
        Name components; ``middle`` may be empty.
    sex:
        ``"F"`` or ``"M"`` (DICOM PatientSex).
    birth_date:
        ``YYYYMMDD``.
    patient_id:
        The hospital MRN.
    other_ids:
        IDs the patient has at other sites (OtherPatientIDs).
    address, phone:
        Postal address and telephone number.
    """

    family: str
    given: str
    middle: str
    sex: str
    birth_date: str
    patient_id: str
    other_ids: tuple[str, ...]
    address: str
    phone: str

    @property
    def dicom_name(self) -> str:
        """The name in DICOM PN form, ``Family^Given^Middle``."""
        parts = [self.family, self.given, self.middle]
        return "^".join(parts).rstrip("^")


def _pick(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[int(rng.integers(len(values)))]


def draw_person(rng: np.random.Generator, *, prefix: str = "") -> str:
    """Draw a staff member's name in DICOM PN form (``Family^Given^^Prefix``).

    Parameters
    ----------
    rng:
        The generator to draw from.
    prefix:
        A name prefix such as ``"Dr."``; empty for none.

    Returns
    -------
    str
        A PN value.
    """
    given = _pick(rng, GIVEN_NAMES_F if rng.random() < 0.5 else GIVEN_NAMES_M)
    name = f"{_pick(rng, FAMILY_NAMES)}^{given}"
    return f"{name}^^{prefix}" if prefix else name


def draw_identity(rng: np.random.Generator, *, index: int) -> Identity:
    """Draw one synthetic patient's identity.

    Parameters
    ----------
    rng:
        The generator to draw from.
    index:
        The patient's position in the archive, which makes the MRN unique.

    Returns
    -------
    Identity
        The identity; the MRN is unique across indices.

    Raises
    ------
    ValueError
        If ``index`` is negative.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    sex = "F" if rng.random() < 0.5 else "M"
    given = _pick(rng, GIVEN_NAMES_F if sex == "F" else GIVEN_NAMES_M)
    middle = (
        _pick(rng, GIVEN_NAMES_F if sex == "F" else GIVEN_NAMES_M)[0] if rng.random() < 0.3 else ""
    )
    year = int(rng.integers(1936, 2004))
    month = int(rng.integers(1, 13))
    day = int(rng.integers(1, 29))
    # unique 8-digit MRN: a random 3-digit block keeps neighbours from looking sequential
    mrn = f"{int(rng.integers(100, 1000))}{index:05d}"
    other = (f"NHS{int(rng.integers(10**8, 10**9))}",) if rng.random() < 0.6 else ()
    street_no = int(rng.integers(1, 400))
    town, postcode = TOWNS[int(rng.integers(len(TOWNS)))]
    address = f"{street_no} {_pick(rng, STREETS)}, {postcode} {town}"
    phone = f"+1-555-{int(rng.integers(1000, 10000)):04d}"
    return Identity(
        family=_pick(rng, FAMILY_NAMES),
        given=given,
        middle=middle,
        sex=sex,
        birth_date=f"{year:04d}{month:02d}{day:02d}",
        patient_id=mrn,
        other_ids=other,
        address=address,
        phone=phone,
    )


def specific_character_set(*texts: str) -> str:
    """Return the SpecificCharacterSet a modality would use for ``texts``.

    Parameters
    ----------
    *texts:
        Every text value the object holds that may be non-ASCII.

    Returns
    -------
    str
        ``"ISO_IR 100"`` (Latin-1) when every text fits Latin-1, else ``"ISO_IR 192"`` (UTF-8).
    """
    try:
        for text in texts:
            text.encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"
