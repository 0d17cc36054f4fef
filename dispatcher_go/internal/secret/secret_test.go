package secret

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestMaskString(t *testing.T) {
	for in, want := range map[string]string{
		"":                "",
		"short":           "****",
		"sk-live-abcd":    "****abcd",
		"sk-1234567890xy": "****90xy",
	} {
		if got := MaskString(in); got != want {
			t.Errorf("MaskString(%q) = %q, want %q", in, got, want)
		}
	}
}

func config() *agentpb.CommonConfig {
	return &agentpb.CommonConfig{
		AuthorizationInfo: &agentpb.Authorization{OrgID: "org", ApiKey: "sk_live_secret1"},
		StageModelConfig: &agentpb.StageModelConfig{
			GroundingModel:       &agentpb.LLMConfig{ModelName: "g", ApiKey: proto.String("sk-ground-9999")},
			ActionGeneratorModel: &agentpb.LLMConfig{ModelName: "a", ApiKey: proto.String("sk-action-abcd")},
			EmbeddingModel:       &agentpb.LLMConfig{ModelName: "e"},
		},
	}
}

func TestMaskWalksEveryAPIKey(t *testing.T) {
	cfg := config()
	m := Mask(cfg)
	if m.GetAuthorizationInfo().GetApiKey() != "****ret1" ||
		m.GetStageModelConfig().GetGroundingModel().GetApiKey() != "****9999" ||
		m.GetStageModelConfig().GetActionGeneratorModel().GetApiKey() != "****abcd" {
		t.Fatalf("not masked: %v", m)
	}
	if m.GetStageModelConfig().GetEmbeddingModel().ApiKey != nil {
		t.Fatal("unset key became set")
	}
	if m.GetAuthorizationInfo().GetOrgID() != "org" || m.GetStageModelConfig().GetGroundingModel().GetModelName() != "g" {
		t.Fatalf("a field that is not secret changed: %v", m)
	}
	if cfg.GetAuthorizationInfo().GetApiKey() != "sk_live_secret1" {
		t.Fatal("Mask modified its input")
	}
}

func TestStripEmptiesEverySecretAndNothingElse(t *testing.T) {
	cfg := config()
	s := Strip(cfg)
	if s.GetAuthorizationInfo().GetApiKey() != "" ||
		s.GetStageModelConfig().GetGroundingModel().ApiKey != nil ||
		s.GetStageModelConfig().GetActionGeneratorModel().ApiKey != nil {
		t.Fatalf("not stripped: %v", s)
	}
	if s.GetAuthorizationInfo().GetOrgID() != "org" || s.GetStageModelConfig().GetActionGeneratorModel().GetModelName() != "a" {
		t.Fatalf("a field that is not secret changed: %v", s)
	}
	if cfg.GetStageModelConfig().GetGroundingModel().GetApiKey() != "sk-ground-9999" {
		t.Fatal("Strip modified its input")
	}
}

func TestSealOpensWithTheSameKeyAndOwnerOnly(t *testing.T) {
	s, err := NewSealer([]byte("k"))
	if err != nil {
		t.Fatal(err)
	}
	sealed := s.Seal(config(), "task-1")
	var back agentpb.CommonConfig
	if !s.Open(sealed, "task-1", &back) || !proto.Equal(&back, config()) {
		t.Fatalf("opened %v", &back)
	}
	if s.Open(sealed, "task-2", &agentpb.CommonConfig{}) {
		t.Fatal("opened with another owner")
	}
	other, _ := NewSealer([]byte("other"))
	if other.Open(sealed, "task-1", &agentpb.CommonConfig{}) {
		t.Fatal("opened with another key")
	}
	none, err := NewSealer(nil)
	if none != nil || err != nil {
		t.Fatalf("no key: %v %v", none, err)
	}
	if none.Seal(config(), "task-1") != nil || none.Open(sealed, "task-1", &agentpb.CommonConfig{}) {
		t.Fatal("a sealer without key sealed or opened")
	}
	if s.Open(nil, "task-1", &agentpb.CommonConfig{}) {
		t.Fatal("opened nothing")
	}
}

// What earlier versions stored (nonce, then AES-256-GCM with the SHA-256 of
// the key, the owner as additional data) still opens.
func TestOpenReadsTheStoredFormat(t *testing.T) {
	k := sha256.Sum256([]byte("the key"))
	block, err := aes.NewCipher(k[:])
	if err != nil {
		t.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := proto.Marshal(config())
	if err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, aead.NonceSize())
	for i := range nonce {
		nonce[i] = byte(i)
	}
	stored := aead.Seal(append([]byte(nil), nonce...), nonce, plain, []byte("global"))

	s, _ := NewSealer([]byte("the key"))
	var back agentpb.CommonConfig
	if !s.Open(stored, "global", &back) || !proto.Equal(&back, config()) {
		t.Fatalf("stored format not opened: %v", &back)
	}
}
